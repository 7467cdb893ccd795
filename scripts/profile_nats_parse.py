"""nats-py's protocol parser on large messages, with and without a heap top pad (glibc).

Feeds ``nats.protocol.parser.Parser`` one HMSG of each size, in 32 KiB chunks as nats-py's
read loop does, ``--n`` times, in a fresh process per setting (``mallopt`` is process-wide):
CPU µs per message, and beside it one copy of the payload (``bytes(bytearray(...))``).
Settings: glibc's defaults, and ``M_TOP_PAD`` = 16 MiB (glibc keeps that much above the heap's
top when it grows or trims it), set by ``mallopt``.

Measured and not kept: the pad cut the parse of a 410 kB message ~10x here, but not the CPU of
a process running ``NatsBridge`` (``bench_bridge.py --only bridge-cpu``, processes with and
without it alternating, ``docs/measurements/dev_heap_slack_ab_*.txt``), where the messages
read ahead keep the heap large anyway.

Run: ``python scripts/profile_nats_parse.py [--n N]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import asyncio, ctypes, sys, time
sys.path.insert(0, sys.argv[1])
from nats.protocol.parser import Parser
import nautilus_pipeline.bridge  # the imports of a bridge process (numpy, nats-py)

class Client:
    async def _process_msg(self, sid, subject, reply, payload, hdr):
        self.n += 1

async def main(pad, n):
    if pad:
        assert ctypes.CDLL(None).mallopt(-2, 16 << 20) == 1  # M_TOP_PAD
    for size in (140_000, 410_000):
        client = Client()
        client.n = 0
        parser = Parser(client)
        hdr = b"NATS/1.0\\r\\n\\r\\n"
        payload = b"x" * size
        msg = (b"HMSG _INBOX.a.1 1 $JS.ACK.TICKS.c.1.1.1.1.0 %d %d\\r\\n" % (len(hdr), len(hdr) + size)
               + hdr + payload + b"\\r\\n")
        chunks = [msg[i:i + 32768] for i in range(0, len(msg), 32768)]
        t0 = time.process_time()
        for _ in range(n):
            for c in chunks:
                await parser.parse(c)
        parse = (time.process_time() - t0) / n * 1e6
        assert client.n == n
        t0 = time.process_time()
        for _ in range(n):
            bytes(bytearray(payload))
        copy = (time.process_time() - t0) / n * 1e6
        print(size, len(chunks), parse, copy)

asyncio.run(main(sys.argv[2] == "pad", int(sys.argv[3])))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="messages of each size")
    ap.add_argument("--repeat", type=int, default=3, help="processes per setting, alternating")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from nautilus_pipeline.machine import describe

    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    chunks: dict[int, int] = {}
    for _ in range(args.repeat):
        for setting in ("default", "pad"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), setting, str(args.n)],
                                 check=True, capture_output=True, text=True).stdout
            for line in out.split("\n"):
                if line:
                    size, k, parse, copy = line.split()
                    chunks[int(size)] = int(k)
                    rows.setdefault((setting, int(size)), []).append((float(parse), float(copy)))
    import statistics

    print(f"machine: {describe()}")
    print(f"| nats-py Parser.parse, one HMSG in 32 KiB chunks, {args.n} messages, median of "
          f"{args.repeat} processes alternating | chunks | glibc defaults µs | M_TOP_PAD 16 MiB µs | "
          "one copy of the payload µs |")
    print("|---|---:|---:|---:|---:|")
    for size in sorted(chunks):
        d = statistics.median(p for p, _ in rows[("default", size)])
        p = statistics.median(p for p, _ in rows[("pad", size)])
        c = statistics.median(c for _, c in rows[("pad", size)])
        print(f"| {size:,} B | {chunks[size]} | {d:,.0f} | {p:,.0f} | {c:,.0f} |")


if __name__ == "__main__":
    main()
