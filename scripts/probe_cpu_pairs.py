"""Which of this machine's CPUs share a physical core? Measured, not read from ``lscpu``.

Why. On the lent 16-CPU GPU hosts (KVM guests), ``lscpu`` says one thread per core, yet
floating-point kernels slow down ~2x when 16 of them run at once while a pure-integer loop
does not slow down at all (``scripts/bench_core_sharing.py --threads``). Two hardware
threads of one core (SMT siblings) behave exactly like that: they share the core's vector
units, not its integer issue slots. A guest that hides its host's topology cannot tell its
scheduler which CPUs are siblings, so N busy workers may be put on N/2 physical cores.

How. One process pinned to each CPU (``sched_setaffinity``), warm. For each pair (a, b)
asked for, the kernel runs on CPU a alone, then on a and b at once, rounds alternating;
``together / alone`` per call is the slowdown b causes a (about 1.0: separate cores; about
1.6-2.0 for the vector kernel: siblings, or two vCPUs the hypervisor runs on one core).

Kernels: ``fma``, a 160 x 160 float64 matrix product (BLAS on one thread, in L2: the
vector units); ``int``, a pure-Python integer loop (the issue slots, little vector work).

``python scripts/probe_cpu_pairs.py`` pairs CPU 0 with every other CPU; ``--all`` every
pair; ``--pairs 0:1 0:8 2:3`` those; ``--rounds`` (default 3) rounds of each. The last lines
name the pairs slowed past ``--shared`` (default 1.4x) and one set of CPUs with no two of
them sharing (greedy, lowest first): the CPUs to pin N <= its size workers to.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: one BLAS thread per process
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import multiprocessing as mp
import platform
import time

import numpy as np


def _fma(a: np.ndarray, out: np.ndarray) -> None:
    np.matmul(a, a, out=out)


def _int() -> None:
    x = 0
    for i in range(20_000):
        x = (x * 31 + i) & 0xFFFF


def _worker(cpu: int, conn) -> None:
    """Pinned to ``cpu``; on ("run", kernel, start_at, seconds) it waits until ``start_at``,
    runs the kernel for ``seconds`` and answers the median µs per call."""
    os.sched_setaffinity(0, {cpu})
    a = np.random.default_rng(cpu).standard_normal((160, 160))
    out = np.empty_like(a)
    for _ in range(200):
        _fma(a, out)
        _int()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        _, kernel, start_at, seconds = msg
        step = (lambda: _fma(a, out)) if kernel == "fma" else _int
        time.sleep(max(0.0, start_at - time.time()))
        calls = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            step()
            calls.append(time.perf_counter() - t0)
        conn.send(float(np.median(calls)) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", metavar="A:B", help="default: CPU 0 with every other CPU")
    ap.add_argument("--all", action="store_true", help="every pair of CPUs")
    ap.add_argument("--shared", type=float, default=1.4, help="the slowdown that marks a pair as sharing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.3, help="per measurement")
    ap.add_argument("--kernels", nargs="+", default=["fma", "int"], choices=["fma", "int"])
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pairs:
        pairs = [tuple(int(c) for c in p.split(":")) for p in args.pairs]
    elif args.all:
        pairs = [(a, b) for i, a in enumerate(cpus) for b in cpus[i + 1:]]
    else:
        pairs = [(cpus[0], c) for c in cpus[1:]]
    if any(a == b for a, b in pairs):
        ap.error("a pair needs two different CPUs")
    if bad := sorted({c for pair in pairs for c in pair} - set(cpus)):
        ap.error(f"CPU(s) {bad} are not usable by this process (usable: {cpus})")
    pairs = [(min(a, b), max(a, b)) for a, b in pairs]
    used = sorted({c for pair in pairs for c in pair})
    ctx = mp.get_context("fork")
    links = {}
    for cpu in used:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(cpu, child), daemon=True)
        proc.start()
        links[cpu] = (proc, parent)

    def run(kernel: str, on: tuple[int, ...]) -> list[float]:
        start_at = time.time() + 0.05
        for cpu in on:
            links[cpu][1].send(("run", kernel, start_at, args.seconds))
        return [links[cpu][1].recv() for cpu in on]

    print(f"machine: {platform.processor() or platform.machine()}, {len(cpus)} CPUs usable, "
          f"{os.cpu_count()} online, Linux {platform.release()}; load average "
          f"{os.getloadavg()[0]:.2f} at the start")
    print(f"median of {args.rounds} rounds, {args.seconds} s of calls per measurement; "
          "one process pinned to each CPU")
    print()
    print("| kernel | CPU a | beside CPU b | a alone µs/call | a beside b µs/call | together ÷ alone |")
    print("|---|---:|---:|---:|---:|---:|")
    shared: set[tuple[int, int]] = set()
    try:
        for kernel in args.kernels:
            for a, b in pairs:
                alone, together = [], []
                for _ in range(args.rounds):
                    alone.append(run(kernel, (a,))[0])
                    together.append(run(kernel, (a, b))[0])
                al, tg = float(np.median(alone)), float(np.median(together))
                print(f"| {kernel} | {a} | {b} | {al:,.1f} | {tg:,.1f} | {tg / al:.2f} |", flush=True)
                if kernel == args.kernels[0] and tg / al > args.shared:
                    shared.add((a, b))
    finally:
        for proc, conn in links.values():
            conn.send(None)
            proc.join(timeout=5)
    print()
    print(f"sharing ({args.kernels[0]} together ÷ alone > {args.shared}): "
          + (" ".join(f"{a}:{b}" for a, b in sorted(shared)) or "none"))
    apart: list[int] = []
    for cpu in used:
        if not any((min(cpu, o), max(cpu, o)) in shared for o in apart):
            apart.append(cpu)
    print("apart: " + ",".join(map(str, apart)) + ("" if args.all or len(used) <= 2 else
                                                  "  (only the pairs measured; --all for every pair)"))


if __name__ == "__main__":
    main()
