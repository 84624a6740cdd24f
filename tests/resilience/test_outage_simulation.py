"""The docs' outage simulation (docs/scripts/plot_breaker.py) behaves as the tutorial says."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from prometheus_client import CollectorRegistry

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "scripts" / "plot_breaker.py"


def test_breaker_sheds_load_during_the_outage_and_closes_after() -> None:
    spec = importlib.util.spec_from_file_location("plot_breaker", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    s = module.simulate(metrics=CollectorRegistry())
    start, end = module.OUTAGE
    sent = dict(zip(s["t"], s["sent"], strict=True))
    before = [sent[t] for t in sent if t < start]
    during = [sent[t] for t in sent if start + 10 <= t < end]
    after = [sent[t] for t in sent if t >= end + 10]
    assert min(before) == module.RATE  # closed: everything goes through
    assert sum(during) < 0.05 * module.RATE * len(during)  # open: only trial calls
    assert min(after) == module.RATE  # closed again after recovery
    states = dict(zip(s["state_t"], s["state"], strict=True))
    assert states[start - 1] == 0 and states[start + 20] == 2 and states[end + 10] == 0
    opened_at = min(t for t, level in states.items() if level == 2)
    assert start < opened_at < start + 10  # reacts within one window length
    # while closed, the window's failure rate never exceeded the 50% threshold by much
    assert max(r for r in s["seen_rate"] if not math.isnan(r)) < 60
