"""Where a pipeline run's time goes: phases, and a sampled profile of every thread.

Why a sampler and not cProfile. A concurrent run works on several threads (the event loop,
each stage's stream worker, pyarrow's readers); cProfile sees one thread and slows the
Python it sees several-fold. This samples ``sys._current_frames()`` every ``--interval-ms``
from a thread of its own and counts, per thread, the innermost frame of this package (or
the innermost frame at all) and the stage stream it belongs to. Time a thread spends waiting
(a queue, a CUDA event) shows as that wait's frame, so the loop thread's busy share is
what the loop is *not* sampled waiting in ``select``.

Phases: reading (the run's read-once pass, before the timed run), the pipeline's start
(stream binding, calibrations, CUDA start-up), the replay until the last batch is in, and
the drain and finish. Prints tables; ``--json`` also writes them.

    python scripts/profile_pipeline.py pipelines/gpu.toml --ticks trades.csv \
        --format binance_trades --symbol BTCUSDT-PERP --batch 65536
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import threading
import time
from pathlib import Path

import orjson

PKG = "nautilus_pipeline"
IDLE = {"select", "_worker", "wait", "_wait_for_tstate_lock", "get", "poll", "run_forever",
        "_run_once", "synchronize"}


class Sampler:
    """Samples the innermost frames of every thread but its own at a fixed interval."""

    def __init__(self, interval_s: float, depth: int = 3):
        self.interval_s = interval_s
        self.depth = depth
        self.samples = 0
        self.phase = "start"  # the pipeline's start, then "run"
        self.leaf: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.pkg: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = threading.get_ident()
        names = {}
        while not self._stop.wait(self.interval_s):
            for t in threading.enumerate():
                if t.ident not in names:  # stream workers share names: number them
                    same = sum(1 for n in names.values() if n.split("#")[0] == t.name)
                    names[t.ident] = f"{t.name}#{same}" if same else t.name
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                thread = f"{names.get(ident, str(ident))} [{self.phase}]"
                self.leaf[thread][_where(frame)] += 1
                f, chain = frame, []
                while f is not None and len(chain) < self.depth:
                    if PKG in f.f_code.co_filename:
                        chain.append(_where(f))
                    f = f.f_back
                self.pkg[thread][" < ".join(chain) or "(outside the package)"] += 1


def _where(frame) -> str:
    code = frame.f_code
    path = code.co_filename
    short = path.split(PKG + "/", 1)[1] if PKG + "/" in path else Path(path).name
    return f"{short}:{code.co_name}"


def _table(title: str, counts: dict[str, collections.Counter[str]], samples: int, top: int) -> list[str]:
    lines = [f"\n{title} (share of {samples:,} samples per thread)"]
    for thread, c in sorted(counts.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(c.values())
        busy = sum(n for w, n in c.items() if w.rsplit(":", 1)[-1] not in IDLE)
        lines.append(f"  thread {thread}: {total:,} samples, {busy / max(total, 1):.0%} outside waits")
        for where, n in c.most_common(top):
            lines.append(f"    {n / max(total, 1):6.1%}  {where}")
    return lines


async def _execute(run, marks: dict[str, float], sampler: Sampler | None = None):
    pipe = run.pipeline
    start, close = pipe.start, pipe.close

    async def timed_start():
        t = time.perf_counter()
        await start()
        marks["start_s"] = time.perf_counter() - t
        marks["started_at"] = time.perf_counter()
        if sampler is not None:
            sampler.phase = "run"

    async def timed_close(*a, **k):
        marks["last_batch_in_at"] = time.perf_counter()
        await close(*a, **k)
        marks["closed_at"] = time.perf_counter()

    pipe.start, pipe.close = timed_start, timed_close
    # each stage's start and bind (calibrations, device start-up, kernel compiles), in order
    from nautilus_pipeline.stage import StageRunner

    runner_start = StageRunner.start

    async def timed_runner_start(self, *a, **k):
        t = time.perf_counter()
        try:
            return await runner_start(self, *a, **k)
        finally:
            marks.setdefault("stage_start", {})[self.stage.name] = time.perf_counter() - t

    StageRunner.start = timed_runner_start
    t0 = time.perf_counter()
    summary = await run.execute()
    marks["wall_s"] = time.perf_counter() - t0
    marks["replay_s"] = marks["last_batch_in_at"] - marks["started_at"]
    marks["drain_finish_s"] = marks["closed_at"] - marks["last_batch_in_at"]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("definition")
    ap.add_argument("--ticks", nargs="*")
    ap.add_argument("--format")
    ap.add_argument("--symbol")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--slabs", type=int)
    ap.add_argument("--out", default="/tmp/profile-run")
    ap.add_argument("--interval-ms", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--no-sample", action="store_true", help="phases only (no sampler overhead)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    a = ap.parse_args()

    from nautilus_pipeline.app import Run
    from nautilus_pipeline.runtime import configure_logging

    configure_logging("auto", a.log_level)
    t = time.perf_counter()
    settings = {"slabs": a.slabs} if a.slabs else None
    run = Run(a.definition, ticks=a.ticks, format=a.format, symbol=a.symbol, batch_size=a.batch,
              out_dir=a.out, pipeline_settings=settings)
    marks: dict[str, float] = {"read_s": time.perf_counter() - t}
    if a.no_sample:
        summary = asyncio.run(_execute(run, marks))
        sampler = None
    else:
        with Sampler(a.interval_ms / 1e3) as sampler:
            summary = asyncio.run(_execute(run, marks, sampler))
    s = summary.as_dict()
    ticks = s["ticks"]["processed"]
    lines = [f"{a.definition}: {ticks:,} ticks, batch {run.pipeline.batch_size:,}; "
             f"{ticks / marks['wall_s']:,.0f} ticks/s over the run, "
             f"{ticks / max(marks['replay_s'] + marks['drain_finish_s'], 1e-9):,.0f} without the start",
             "phases (s): " + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in marks.items() if k.endswith("_s")),
             "start by stage (s): " + ", ".join(f"{k} {v:.3f}" for k, v in marks.get("stage_start", {}).items())]
    pool = s.get("pool", {})
    lines.append("pool: " + ", ".join(f"{k} {pool[k]}" for k in
                                      ("slabs", "capacity", "memory", "high_water", "acquire_waits",
                                       "acquire_wait_s", "bytes_copied_h2d", "bytes_copied_d2h")
                                      if k in pool))
    lines.append(f"{'stage':<10} {'stream':<11} {'batches':>7} {'busy s':>7} {'mean ms':>8}  extra")
    for st in s.get("stages", []):
        lat = st.get("batch_latency", {})
        mean_ms = (lat.get("mean_us") or 0) / 1e3
        extra = {k: st[k] for k in ("gpu_batches", "rows_by_backend", "var_reports") if k in st}
        lines.append(f"{st['stage']:<10} {st['stream']:<11} {st['batches']:>7} "
                     f"{mean_ms * st['batches'] / 1e3:>7.3f} {mean_ms:>8.2f}  {extra or ''}")
    if sampler is not None:
        lines += _table("innermost frame", sampler.leaf, sampler.samples, a.top)
        lines += _table("innermost package frames", sampler.pkg, sampler.samples, a.top)
    print("\n".join(lines))
    if a.json:
        a.json.write_bytes(orjson.dumps({"marks": marks, "summary": s}, option=orjson.OPT_SERIALIZE_NUMPY))


if __name__ == "__main__":
    main()
