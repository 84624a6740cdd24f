"""The stock ticker and trading example (issue 16): a small exchange plus a broker.

Modules: :mod:`.matching` (the pure matching engine), :mod:`.market` (instruments,
subjects, tick and packet formats), :mod:`.feed`, :mod:`.matcher`, :mod:`.ticker` and
:mod:`.api` (the services, each ``python -m examples.trading.<name>``), :mod:`.system`
(start them all) and ``__main__`` (``python -m examples.trading``). See
``docs/tutorials/trading.md``.
"""
