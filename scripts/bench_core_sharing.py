"""Benchmark: do two of this machine's cores run the pipeline's two heavy kernels at full speed at once?

Why. In ``scripts/bench_pipeline.py`` the concurrent replay's per-stage p50s are ~1.5x the
serial run's (inference 1.5 -> 2.2 ms, risk 1.2 -> 1.9 ms per 4096-row batch on the dev VM),
so "cores busy" overstates the work done: a core that runs at two thirds of its speed
beside the other is busy but slow. This asks the hardware directly, with no pipeline, no
event loop and no GIL in the way (both kernels release it): each kernel timed alone on
one thread, then both at once on two threads, alternating rounds; the ratio ``together /
alone`` per call is the slowdown the sharing causes (1.00: two independent cores; ~1.6-2:
siblings of one physical core, or a shared memory or power budget).

Kernels (the default pipeline's, at its batch size):
- ``inference``: ``kernels.mlp.mlp_forward`` on 4096 x 50 float32 rows (the default model's
  shapes, BLAS on one thread);
- ``fixed-order``: the same rows through ``kernels.mlp.RowOrderForward`` (numba, the sums in
  one written order), what the default pipeline's inference stage runs on the CPU;
- ``var``: one Monte Carlo VaR report, ``McSampler.bootstrap`` of 10,000 paths x 100 steps;
- ``spin``: a pure-integer numba loop (no memory traffic), the control;
- ``stream``: ``np.add`` over 3 x 32 MB float64 arrays (memory bandwidth).

Every thread has its own workspace, scratch and output (:func:`per_thread`). Until
2026-12-07 the two threads of a pair shared the MLP's scratch and the sampler, so the
"together" figures of ``inference`` and ``var`` included the threads' fight over shared
cache lines.

``--threads 1 2 4 8 16`` asks the same of N cores instead of two (issue 10's efficiency
target on a 16-core host): each kernel on N threads at once, per call ÷ alone. What a
batch of N workers can reach at best when each job's work is these kernels': 1.00 means N
cores as fast as one; 1.4 means N workers reach N ÷ 1.4 times one worker, whatever the
engine does.

    python scripts/bench_core_sharing.py [--rounds 7] [--seconds 0.4] [--threads 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import threading
import time

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _spin(n):
    x = np.uint64(88172645463325252)
    for _ in range(n):
        x ^= x << np.uint64(13)
        x ^= x >> np.uint64(7)
        x ^= x << np.uint64(17)
    return x


def per_thread(make):
    """A call that runs ``make()``'s kernel, built once per thread: every thread its own
    workspace, scratch and output, as each stage (and each batch worker) keeps its own; shared
    buffers would measure the threads' fight over their cache lines, not the cores."""
    local = threading.local()

    def run():
        fn = getattr(local, "fn", None)
        if fn is None:
            fn = local.fn = make()
        fn()
    return run


def kernels() -> dict:
    from nautilus_pipeline.kernels.mlp import MLPWorkspace, RowOrderForward, mlp_forward
    from nautilus_pipeline.kernels.montecarlo import McSampler

    rng = np.random.default_rng(0)
    widths = [50, 128, 64, 32, 1]
    mats = [rng.standard_normal((o, i)).astype(np.float32) * 0.1 for i, o in itertools.pairwise(widths)]
    biases = [np.zeros(o, dtype=np.float32) for o in widths[1:]]
    x = rng.standard_normal((4096, 50)).astype(np.float32)
    x64 = x.astype(np.float64)
    returns = rng.standard_normal(2000) * 1e-4

    def workspace():
        return MLPWorkspace(np.zeros(50), np.ones(50), mats, biases, capacity=4096)

    def inference():
        ws, out = workspace(), np.empty(4096, dtype=np.float32)
        return lambda: mlp_forward(ws, x, out)

    def fixed_order():
        fwd, out = RowOrderForward(workspace()), np.empty(4096, dtype=np.float32)
        return lambda: fwd(x64, 4096, out)

    def var():
        sampler = McSampler(seed=1)
        return lambda: sampler.bootstrap(returns, 100, 10_000, 1.0)

    def stream():  # memory bandwidth: three 32 MB arrays
        a, b, c = (np.ones(4_000_000) for _ in range(3))
        return lambda: np.add(a, b, out=c)

    return {
        "inference": per_thread(inference),
        "fixed-order": per_thread(fixed_order),
        "var": per_thread(var),
        "spin": lambda: _spin(2_000_000),
        "stream": per_thread(stream),
    }


def per_call(fn, seconds: float, start: threading.Barrier | None = None) -> float:
    """Seconds per call of ``fn`` over about ``seconds`` of calls."""
    if start is not None:
        start.wait()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        t = time.perf_counter() - t0
        if t >= seconds:
            return t / n


def together(fa, fb, seconds: float) -> tuple[float, float]:
    res: dict[str, float] = {}
    start = threading.Barrier(2)
    def one(key: str, fn) -> None:
        fn()  # this thread's kernel built and warm before the clock starts
        res[key] = per_call(fn, seconds, start)
    ta = threading.Thread(target=one, args=("a", fa))
    tb = threading.Thread(target=one, args=("b", fb))
    ta.start()
    tb.start()
    ta.join()
    tb.join()
    return res["a"], res["b"]


def at_once(fn, n: int, seconds: float) -> list[float]:
    """``fn`` on ``n`` threads started together: each thread's seconds per call."""
    res: list[float] = [0.0] * n
    start = threading.Barrier(n)

    def one(i: int) -> None:
        fn()  # this thread's arrays made and touched before the clock starts
        res[i] = per_call(fn, seconds, start)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return res


def scaling(ks: dict, counts: list[int], rounds: int, seconds: float) -> None:
    """Each kernel on N threads at once vs alone, alternating rounds; median over rounds of
    the threads' median per call, and of the slowest thread's."""
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {(k, n): [] for k in ks for n in counts}
    for _ in range(rounds):
        for k, fn in ks.items():
            for n in counts:
                per = at_once(fn, n, seconds)
                runs[k, n].append((statistics.median(per), max(per)))
    print(f"median of {rounds} rounds, ~{seconds} s of calls per measurement; BLAS on 1 thread; "
          "N threads each running the kernel at once\n")
    print("| kernel | threads | µs per call (median thread) | slowest thread | ÷ 1 thread | "
          "N threads reach (N ÷ ratio) |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in ks:
        one = statistics.median(r[0] for r in runs[k, counts[0]]) if counts[0] == 1 else None
        for n in counts:
            med = statistics.median(r[0] for r in runs[k, n])
            slow = statistics.median(r[1] for r in runs[k, n])
            ratio = med / one if one else float("nan")
            print(f"| {k} | {n} | {med * 1e6:,.1f} | {slow * 1e6:,.1f} | {ratio:.2f} | {n / ratio:.1f} |")


def main() -> None:
    from nautilus_pipeline.machine import describe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.4, help="per measurement")
    ap.add_argument("--threads", type=int, nargs="+", metavar="N",
                    help="scaling instead of pairs: each kernel on N threads at once (start with 1)")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    ks = kernels()
    for fn in ks.values():  # compile / load, warm the caches
        per_call(fn, 0.05)
    if args.threads:
        from nautilus_pipeline.machine import describe

        print(f"machine: {describe()}; load average {os.getloadavg()[0]:.2f} at the start")
        scaling(ks, args.threads, args.rounds, args.seconds)
        return
    pairs = [("inference", "inference"), ("var", "var"), ("inference", "var"), ("spin", "spin")]
    alone: dict[str, list[float]] = {k: [] for k in ks}
    both: dict[tuple[str, str], list[tuple[float, float]]] = {p: [] for p in pairs}
    for _ in range(args.rounds):  # alternating, so a noisy moment hits every row
        for k, fn in ks.items():
            alone[k].append(per_call(fn, args.seconds))
        for a, b in pairs:
            both[a, b].append(together(ks[a], ks[b], args.seconds))
    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.2f} at the end")
    print(f"median of {args.rounds} rounds, ~{args.seconds} s of calls per measurement; BLAS on 1 thread\n")
    print("| kernel | alone µs per call | beside | together µs per call | together ÷ alone |")
    print("|---|---:|---|---:|---:|")
    med = {k: statistics.median(v) for k, v in alone.items()}
    for (a, b), runs in both.items():
        ta = statistics.median(r[0] for r in runs)
        tb = statistics.median(r[1] for r in runs)
        print(f"| {a} | {med[a] * 1e6:,.1f} | {b} | {ta * 1e6:,.1f} | {ta / med[a]:.2f} |")
        if a != b:
            print(f"| {b} | {med[b] * 1e6:,.1f} | {a} | {tb * 1e6:,.1f} | {tb / med[b]:.2f} |")


if __name__ == "__main__":
    main()
