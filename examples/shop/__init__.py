"""The shop example: an e-commerce system built only from dsys blocks (issue 17).

See ``docs/tutorials/shop.md``; run it with ``python -m examples.shop``.
"""
