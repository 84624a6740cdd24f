"""Draw docs/img/breaker-outage.png: a circuit breaker through a simulated outage.

A real ``dsys.resilience.CircuitBreaker`` on a ``ManualClock`` guards a simulated
dependency that answers 50 requests per second. Its error rate is 2% until t=30 s,
100% during the outage (t=30..75 s), then 2% again. The script steps the clock 20 ms
at a time, sends each request through the breaker and plots, per second: the
dependency's true error rate, the failure rate the breaker sees in its window, the
requests that reached the dependency, and the breaker state.

Run it from the repository root (needs matplotlib, which is not a dsys dependency)::

    .venv/bin/pip install matplotlib
    .venv/bin/python docs/scripts/plot_breaker.py      # writes docs/img/breaker-outage.png
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from dsys.clock import ManualClock
from dsys.errors import CircuitOpenError
from dsys.resilience import BreakerState, CircuitBreaker, TimeWindow

OUT = Path(__file__).resolve().parent.parent / "img" / "breaker-outage.png"
DURATION = 120.0
RATE = 50  # requests per second
OUTAGE = (30.0, 75.0)
STATE_LEVEL = {
    BreakerState.CLOSED: 0,
    BreakerState.HALF_OPEN: 1,
    BreakerState.OPEN: 2,
    BreakerState.FORCED_OPEN: 2,
    BreakerState.DISABLED: 0,
}


class DependencyError(Exception):
    """The simulated dependency answered 5xx."""


def simulate(seed: int = 7, **breaker_args: object) -> dict[str, list[float]]:
    """Run the outage; return per-second series and the (time, state) samples."""
    clock = ManualClock()
    rng = random.Random(seed)
    breaker = CircuitBreaker(
        "inventory",
        failure_rate_threshold=50,
        window=TimeWindow(seconds=10, buckets=10),
        minimum_calls=20,
        open_wait=4.0,
        open_wait_multiplier=2.0,
        open_wait_max=16.0,
        permitted_calls_in_half_open=5,
        clock=clock,
        **breaker_args,  # type: ignore[arg-type]
    )

    def dependency(now: float) -> str:
        down = OUTAGE[0] <= now < OUTAGE[1]
        if rng.random() < (1.0 if down else 0.02):
            raise DependencyError("503")
        return "200"

    series: dict[str, list[float]] = {
        "t": [],
        "true_error": [],
        "seen_rate": [],
        "sent": [],
        "state_t": [],
        "state": [],
    }
    step = 1.0 / RATE
    sent = 0
    second = 0
    for i in range(int(DURATION * RATE)):
        now = i * step
        clock.set(now)
        if int(now) != second:
            series["t"].append(float(second))
            series["sent"].append(float(sent))
            series["true_error"].append(100.0 if OUTAGE[0] <= second < OUTAGE[1] else 2.0)
            counts = breaker.counts()
            closed = breaker.state is BreakerState.CLOSED
            series["seen_rate"].append(counts.failure_rate if closed else float("nan"))
            sent = 0
            second = int(now)
        try:
            breaker.call(dependency, now)
            sent += 1
        except DependencyError:
            sent += 1
        except CircuitOpenError:
            pass
        series["state_t"].append(now)
        series["state"].append(float(STATE_LEVEL[breaker.state]))
    return series


def plot(series: dict[str, list[float]], out: Path) -> None:
    """Draw the three panels into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(
        3, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 2, 1.3]}
    )
    for ax in (ax1, ax2, ax3):
        ax.axvspan(*OUTAGE, color="#f4cccc", alpha=0.5, lw=0)
    ax1.plot(
        series["t"], series["true_error"], color="#999999", lw=1.5, label="dependency error rate"
    )
    ax1.plot(
        series["t"],
        series["seen_rate"],
        color="#c0392b",
        lw=1.5,
        label="failure rate in window (while closed)",
    )
    ax1.axhline(50, color="#c0392b", ls=":", lw=1, label="threshold (50%)")
    ax1.set_ylabel("%")
    ax1.set_ylim(-5, 105)
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title("CircuitBreaker during a 45 s outage (50 requests/s, ManualClock simulation)")
    ax2.plot(series["t"], series["sent"], color="#2c7fb8", lw=1.5)
    ax2.set_ylabel("requests sent\nto dependency / s")
    ax2.set_ylim(-2, RATE + 5)
    ax3.step(series["state_t"], series["state"], where="post", color="#333333", lw=1.2)
    ax3.set_yticks([0, 1, 2], ["closed", "half-open", "open"])
    ax3.set_ylim(-0.4, 2.4)
    ax3.set_xlabel("time (s); shaded: outage")
    ax3.set_xlim(0, DURATION)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> int:
    """Simulate and draw."""
    plot(simulate(), OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
