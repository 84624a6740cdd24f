"""``python -m examples.trading``: run the stock ticker and trading system on loopback.

Starts every process (see :mod:`.system`), prints where the web page is, walks through a
short session (sign up, watch ticks through the load-balanced ticker, buy at market, see
the fill and the portfolio, sell half), then serves until Ctrl-C, or for ``--seconds N``.
``run(seconds)`` does the same from Python (for ``make demo``) and returns the transcript.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from .market import instruments, unpack_message
from .system import TradingSystem


def _rupees(paise: int) -> str:
    return f"{paise / 100:,.2f}"


async def session(ts: TradingSystem, say: Callable[[str], None]) -> None:
    """A scripted user session against the running system."""
    insts = instruments(ts.n_instruments)
    watch = insts[:3]
    async with aiohttp.ClientSession() as http:

        async def call(method: str, path: str, token: str = "", **body: Any) -> Any:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.request(
                method, f"{ts.api_url}{path}", json=body or None, headers=headers
            ) as r:
                return await r.json()

        user = f"demo_{int(time.time()) % 100000}"
        token = (await call("POST", "/api/signup", user=user, password="correct horse"))["token"]
        say(f"signed up {user!r}; token {token[:24]}...")
        async with http.ws_connect(ts.ticker_url) as ws:
            await ws.send_str(json.dumps({"a": "subscribe", "v": [i.token for i in watch]}))
            await ws.send_str(json.dumps({"a": "mode", "v": ["ltp", [watch[0].token]]}))
            got = 0
            deadline = time.monotonic() + 5
            while got < 3 and time.monotonic() < deadline:
                msg = await ws.receive(timeout=5)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                for tick in unpack_message(msg.data):
                    sym = next(i.symbol for i in insts if i.token == tick["instrument_token"])
                    ltp = _rupees(int(str(tick["last_price"])))
                    say(f"tick via dsys lb: {sym:10} {tick['mode']:5} ltp {ltp}")
                    got += 1
        sym = watch[0].symbol
        o = await call("POST", "/api/orders", token, symbol=sym, side="BUY", qty=10, type="MARKET")
        say(
            f"BUY 10 {sym} at market -> {o['status']}, filled {o['filled']} "
            f"at {_rupees(o['avg_price'])}"
        )
        o = await call("POST", "/api/orders", token, symbol=sym, side="SELL", qty=5, type="MARKET")
        say(f"SELL 5 {sym} at market -> {o['status']}, filled {o['filled']}")
        bad = await call("POST", "/api/orders", token, symbol="NOPE", side="BUY", qty=1)
        say(f"an order for an unknown instrument -> {bad['error']}")
        p = await call("GET", "/api/portfolio", token)
        hold = ", ".join(f"{h['symbol']} x{h['qty']}" for h in p["holdings"])
        say(
            f"portfolio: cash {_rupees(p['cash'])}, reserved {_rupees(p['reserved'])}, "
            f"holdings {hold}, P&L {_rupees(p['pnl'])}"
        )


def run(seconds: float | None = None, *, instruments_count: int = 500, out: Any = None) -> str:
    """Start everything, run the session, serve for ``seconds`` (None: until Ctrl-C)."""
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        print(f"  {text}", file=out or sys.stdout, flush=True)

    t0 = time.monotonic()
    with TradingSystem(instruments=instruments_count) as ts:
        say(
            f"started {len(ts.servers) + len(ts.raw)} processes in {time.monotonic() - t0:.1f} s: "
            f"pub/sub {ts.pubsub}, KV {ts.kv}, streams {ts.streams}, matchers "
            f"{', '.join(ts.matcher_addr(m) for m in ts.matcher_ids)}, {ts.n_tickers} tickers "
            f"behind dsys lb {ts.lb}"
        )
        say(f"web page: {ts.api_url}/   ticker: {ts.ticker_url}")
        asyncio.run(session(ts, say))
        if seconds is None:
            say("serving; Ctrl-C stops every process")
            stop = [False]

            def handler(signum: int, frame: object) -> None:
                stop[0] = True

            signal.signal(signal.SIGTERM, handler)
            with contextlib.suppress(KeyboardInterrupt):
                while not stop[0]:
                    time.sleep(0.5)
        else:
            time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    say("every process stopped")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m examples.trading", description=__doc__)
    p.add_argument("--seconds", type=float, default=None, help="stop after N seconds")
    p.add_argument("--instruments", type=int, default=500)
    args = p.parse_args()
    print("\033[1m== Stock ticker and trading system (examples/trading)\033[0m", flush=True)
    run(args.seconds, instruments_count=args.instruments)


if __name__ == "__main__":
    main()
