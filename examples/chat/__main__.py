"""``python -m examples.chat``: the chat system on loopback, until Ctrl-C.

Starts 3 KV nodes, the stream cluster, a pub/sub broker, 2 chat servers and ``dsys lb``,
plays a short scripted conversation through the load balancer (alice and bob; one chat
server is killed with SIGKILL in the middle; both clients reconnect and miss nothing),
then serves the browser page until Ctrl-C (or for ``--seconds N``).

``run(seconds=5)`` is the same as a function, for ``make demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time

from dsys.observability import configure_logging

from .client import ChatClient
from .cluster import ChatCluster


def _line(text: str) -> None:
    print(text, flush=True)


async def transcript(cluster: ChatCluster) -> bool:
    """A scripted conversation through the load balancer; True if nobody missed anything."""
    shown: set[tuple[str, int]] = set()

    def show(c: ChatClient, m: dict[str, object]) -> None:
        key = (str(m["room"]), int(m["offset"]))  # type: ignore[call-overload]
        if c.user == "bob" and key not in shown:  # print each message once, as bob sees it
            shown.add(key)
            _line(f"  [{m['room']} #{m['offset']} via {c.server}] {m['from']}: {m['text']}")

    async with (
        ChatClient(cluster.url, "alice", on_msg=show) as alice,
        ChatClient(cluster.url, "bob", on_msg=show) as bob,
    ):
        _line(f"  alice is on chat server {alice.server}, bob on {bob.server}")
        with contextlib.suppress(Exception):
            await alice.create("general")
        await alice.subscribe("general")
        await bob.join("general")
        lines = [
            (alice, "hi bob, this room's history lives in a Raft-replicated stream"),
            (bob, "and the fan-out between chat servers goes through the pub/sub broker"),
            (alice, "accounts, rooms and read markers are in the Raft KV store"),
        ]
        for who, text in lines:
            await who.send("general", text)
        await asyncio.sleep(0.3)
        victim = alice.server or "s1"
        _line(f"  -- kill -9 chat server {victim} (alice's) --")
        cluster.kill(victim)
        await alice.send("general", "(typed while my server was down: resent on reconnect)")
        await bob.send("general", "still here")
        await alice.send("general", "reconnected through the load balancer, resumed at my offset")
        want = list(range(1, 7))
        for _ in range(150):  # both have every message (bounded: 15 s)
            if alice.offsets("general") == bob.offsets("general") == want:
                break
            await asyncio.sleep(0.1)
        _line(f"  alice now on {alice.server}, bob on {bob.server}")
        cluster.restart(victim)
        ok = alice.offsets("general") == bob.offsets("general") == want
        ok = ok and alice.dups == bob.dups == alice.holes == bob.holes == 0
        _line(
            f"  alice saw offsets {alice.offsets('general')}, bob {bob.offsets('general')}; "
            f"duplicates {alice.dups + bob.dups}, holes {alice.holes + bob.holes}"
        )
        return ok


async def _amain(args: argparse.Namespace) -> int:
    _line("dsys chat: starting the processes on 127.0.0.1 ...")
    cluster = ChatCluster(
        chat_servers=args.chat_servers,
        stream_nodes=args.stream_nodes,
        brokers=args.brokers,
        password_cost="fast" if args.seconds is not None else "default",
        verbose=True,
    )
    await asyncio.to_thread(cluster.start)
    try:
        _line("\nA conversation through the load balancer:")
        ok = await asyncio.wait_for(transcript(cluster), 60)
        _line(f"  nothing missed, nothing twice: {ok}")
        _line(f"\nOpen {cluster.url}/ in a browser (sign up, then chat).")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.seconds is None:
            _line("Ctrl-C stops everything.")
            await stop.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.seconds)
        return 0 if ok else 1
    finally:
        start = time.monotonic()
        await asyncio.to_thread(cluster.stop)
        _line(f"stopped every process ({time.monotonic() - start:.1f} s)")


def run(seconds: float = 3.0, argv: list[str] | None = None) -> int:
    """Run the chat briefly (for ``make demo``): start, transcript, ``seconds`` idle, stop."""
    return main([*(argv or []), "--seconds", str(seconds)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.chat", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=None, help="stop after N seconds")
    p.add_argument("--chat-servers", type=int, default=2)
    p.add_argument("--stream-nodes", type=int, default=1, choices=(1, 3))
    p.add_argument("--brokers", type=int, default=1)
    args = p.parse_args(argv)
    configure_logging(level="error")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_amain(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
