"""Merging a batch: the jobs' outputs into one Parquet dataset per kind, and ``summary.json``.

Each output kind (``signals``, ``vpin``, ``risk``, ``trace``, ...) becomes
``<out>/<kind>/symbol=<S>/part-0.parquet`` (hive partitioning: ``pyarrow.dataset``, DuckDB,
Polars and Spark read the folder as one table with a ``symbol`` column). Rows are in
(symbol, ts_ns) order, ties in the order the chain produced them, so a merged kind equals one
sequential run per symbol over its files, sorted the same way (a stable sort). Files are
written under a temporary name and renamed.

The merge streams (:class:`StreamingMerge`): each job's parts are appended to their
symbol's file as the job's result comes in, on threads of the driver (chains side by side),
while the other jobs run; after the last job only its own parts are left. Merging after the
jobs, the old way, was 0.3-0.4 s of a 7-13 s batch of 8 files × 1M trades on the quiet dev
VM (``docs/measurements/dev_bench_batch_quiet_b22cc61.txt``), all of it after the last job.

``summary.json`` accounts for every row of every file: per file and in total,
``read = delivered + rejected + quarantined``; files of failed or cancelled chains are listed
with their status (``failed``, ``not_run``) and the error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..app import write_atomic
from ..io.arrow_numpy import scalar, to_numpy
from ..io.parquet_out import dictionary_columns
from .job import JobResult
from .plan import Chain

SKIPPED_KINDS = ("latency",)
"""Per-job outputs that are not merged (latency windows are per process, not per symbol)."""
COUNTS = ("read", "delivered", "rejected", "quarantined")


def output_kinds(results: Sequence[JobResult]) -> list[str]:
    """The kinds :func:`merge_outputs` merges, in its order."""
    return sorted({k for r in results for k in r.paths if k not in SKIPPED_KINDS})


def merge_outputs(out: Path, results: Sequence[JobResult], *,
                  merged: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """One dataset per kind of the jobs' Parquet outputs; returns kind → rows, folder and
    whether it was streamed (see :class:`StreamingMerge`).

    ``merged`` is filled kind by kind as each is in place, so a caller stopped half-way (a
    Ctrl-C) knows which kinds are complete; a kind cut short leaves no temporary folder.

    A chain's jobs are appended in chain order, one part in memory at a time (the chain is
    ordered by first timestamp and checked not to overlap, so the parts follow each other in
    time); a symbol whose parts do not is sorted (stable) in memory instead. Merging costs
    one read and one write of each part, not a global sort. This is :class:`StreamingMerge`
    with every result given at once."""
    merger = StreamingMerge(out, threaded=False)
    for res in results:
        merger.add(res)
    return merger.finish(results, merged=merged)


def _merge_all(out: Path, kinds: dict[str, list[tuple[str, str]]],
               merged: dict[str, dict[str, Any]]) -> None:
    """``kinds`` (kind → (job, part) pairs) merged from their parts, kind by kind, and installed."""
    for kind, parts in sorted(kinds.items()):
        tmp = out / f".{kind}.merging"
        try:
            rows = _merge_kind(kind, parts, tmp)
            _install_recorded(out, kind, tmp, rows, merged, streamed=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _install_recorded(out: Path, kind: str, tmp: Path, rows: int, merged: dict[str, dict[str, Any]], *,
                      streamed: bool) -> None:
    with deferred_signals():  # in place and recorded, or neither
        _install(tmp, out / kind)
        merged[kind] = {"rows": rows, "path": str(out / kind), "streamed": streamed}


class StreamingMerge:
    """The merge done while the jobs run: each result's parts are appended to their symbol's
    file as the result comes (on threads of the driver, ``threaded``), so what is left after
    the last job is that job's parts, the files' footers and the renames: a chain's jobs end
    in chain order, which is the merge's order.

    Threaded, chains are appended side by side on a small pool (:data:`MERGE_THREADS`
    threads, each niced below the workers: :func:`_yield_to_workers`). Chains have distinct
    (kind, symbol) files, so where many jobs end together (16 workers, one job each) their
    parts need not wait for one thread to append them one after the other after the last job
    (that tail was 1.39 s of an 8.6 s batch, and 1.14 s of a 16.2 s one, on a 16-core host:
    ``docs/measurements/gpu_bench_batch_4166f12_h100.txt``). A chain is on one thread at a time
    (``_busy``), its jobs in chain order (``_early``, ``_next``), so each writer is used by one
    thread at a time; the state the chains share is under one lock. Given 16 chains' results
    at once (``scripts/bench_merge_tail.py``, 300k trades each, 2-core dev VM, 2 threads), the
    merge took 0.55 s against 0.79 on one thread, median of 5 alternating
    (``docs/measurements/dev_merge_tail_parallel_3d80912.txt``).

    It streams only the common case: every part of a kind with a ``symbol`` column holding
    one symbol, each symbol from one chain, the parts of a symbol in time order one after
    the other, one schema per kind. Anything else (a part out of time order, a symbol in two
    chains, a part with a column the first one lacked) makes :meth:`finish` merge that kind
    again from its parts the whole way (:func:`_merge_kind`), the same rows as ever. Empty
    parts are skipped, as there. Which of these holds does not depend on the order the
    chains are appended in, so the pool writes what one thread writes.

    Measured (``scripts/bench_batch.py``, 8 files × 1M trades, loaded dev VM): what the merge
    leaves after the last job; see the README's batch table."""

    def __init__(self, out: Path, *, threaded: bool = True):
        self.out = Path(out)
        self._parts: dict[str, list[tuple[str, str]]] = {}  # kind → (job, part), as added
        self._added: set[str] = set()
        self._next: dict[str, int] = {}  # chain → index of its next job to append
        self._early: dict[str, dict[int, JobResult]] = {}  # chain → results ahead of their turn
        self._busy: set[str] = set()  # chains a thread is appending (one thread per chain)
        self._writers: dict[tuple[str, str], tuple[pq.ParquetWriter, pa.Schema]] = {}  # (kind, symbol)
        self._last_ts: dict[tuple[str, str], int] = {}
        self._rows: dict[str, int] = {}
        self._owner: dict[tuple[str, str], str] = {}  # (kind, symbol) → chain
        self._schemas: dict[str, pa.Schema] = {}  # kind → schema of its first non-empty part
        self._whole: set[str] = set()  # kinds to merge the whole way
        self._error: BaseException | None = None
        self._tail = False  # finish() has begun: no job runs any more
        self.cpu_s = 0.0  # CPU seconds of the merge's threads appending parts, summed (their
        # wall is longer where they share the cores with the workers; the parts read after the
        # last job, on pyarrow's pool, count only these threads' share)
        self._lock = threading.Lock()  # the state above, between the caller and the pool
        self._threaded = threaded
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        # what a batch killed mid-run (kill -9, OOM) left here would be installed with this
        # batch's parts: the streamed folders are this batch's alone (review finding)
        for stale in self.out.glob(".*.merging"):
            shutil.rmtree(stale, ignore_errors=True)
        if threaded:
            self._pool = ThreadPoolExecutor(MERGE_THREADS, thread_name_prefix="batch-merge",
                                            initializer=_yield_to_workers)

    def add(self, result: JobResult) -> None:
        """A finished job: its parts are appended now (on the pool, when there is one), or
        held until its chain's jobs before it are."""
        chain, index = chain_index(result.job_id)
        with self._lock:
            if self._stop.is_set():
                return
            self._added.add(result.job_id)
            for kind, path in result.paths.items():
                if kind not in SKIPPED_KINDS:
                    self._parts.setdefault(kind, []).append((result.job_id, path))
            if self._error is not None:
                return
            self._early.setdefault(chain, {})[index] = result
            if chain in self._busy or (self._threaded and self._pool is None):
                return  # the chain's thread takes it next (or finish() has joined the pool)
            self._busy.add(chain)
            if self._pool is not None:
                # submitted under the lock: abort() sets _stop under it before shutting the pool
                self._pool.submit(self._append_chain, chain)
                return
        self._append_chain(chain)

    def _append_chain(self, chain: str) -> None:
        """``chain``'s results appended while the next in its order is there (one thread per
        chain: the caller marked it ``_busy``, it is unmarked where this stops)."""
        t0 = time.thread_time()
        try:
            while (nxt := self._next_of(chain)) is not None:
                for kind, path in sorted(nxt.paths.items()):
                    with self._lock:
                        if self._stop.is_set() or self._error is not None:
                            self._busy.discard(chain)
                            return
                        skip = kind in SKIPPED_KINDS or kind in self._whole
                    if not skip and not self._append(kind, chain, path):
                        with self._lock:
                            self._whole.add(kind)
        except Exception as exc:  # merged again the whole way in finish(), which says it if it fails
            with self._lock:
                self._error = self._error or exc
                self._busy.discard(chain)
        finally:
            with self._lock:
                self.cpu_s += time.thread_time() - t0

    def _next_of(self, chain: str) -> JobResult | None:
        """The chain's next result in its order, or None (the chain no longer busy)."""
        with self._lock:
            nxt = None if self._stop.is_set() or self._error is not None else \
                self._early[chain].pop(self._next.get(chain, 0), None)
            if nxt is None:
                self._busy.discard(chain)
            else:
                self._next[chain] = self._next.get(chain, 0) + 1
            return nxt

    def _append(self, kind: str, chain: str, path: str) -> bool:
        """One part appended to its symbol's file; False where the kind cannot be streamed.
        The (kind, symbol) file is its owner chain's alone, so only the kind's schema, the
        owner and the row count are shared."""
        # one open and one read of the part: its footer, its symbol column and then the whole
        # through pq.read_table cost 0.16 s of CPU against 0.09 for the 32 parts of 8 files
        # x 1M trades (loaded VM: docs/measurements/dev_merge_read_5835c64.txt)
        with pq.ParquetFile(path) as pf:
            if not pf.metadata.num_rows:
                return True
            schema = pf.schema_arrow
            with self._lock:
                first = self._schemas.setdefault(kind, schema)
            if "symbol" not in schema.names or not schema.equals(first):
                return False
            # while jobs run, decoded on this thread, not on pyarrow's pool: that pool's
            # threads are not at the merge's nice value, they would take the workers' cores
            # (and cpu_s, this thread's CPU, would miss them); CPU the same (0.089 s pooled,
            # 0.098 here). After the last job (finish) the cores are free: the pool's again.
            table = pf.read(use_threads=self._tail)
        symbols = pc.unique(table["symbol"].cast(pa.string())).to_pylist()
        if len(symbols) != 1:
            return False
        key = (kind, symbols[0])
        with self._lock:
            owner = self._owner.setdefault(key, chain)
            entry = self._writers.get(key)
        if owner != chain:
            return False
        table = _conform(table, schema, symbols[0])
        if "ts_ns" in table.column_names:
            if table["ts_ns"].null_count:  # no time order to keep: the sorted merge's (nulls last)
                return False
            ts = to_numpy(table["ts_ns"])
            if (key in self._last_ts and ts[0] < self._last_ts[key]) or not (ts[1:] >= ts[:-1]).all():
                return False
            self._last_ts[key] = int(ts[-1])
        if entry is None:
            folder = self.out / f".{kind}.merging" / f"symbol={quote(symbols[0], safe='')}"
            folder.mkdir(parents=True, exist_ok=True)
            out_schema = schema.remove(schema.get_field_index("symbol"))
            entry = (pq.ParquetWriter(folder / "part-0.parquet", out_schema,
                                      use_dictionary=dictionary_columns(out_schema)), out_schema)
            with self._lock:
                self._writers[key] = entry
        writer, out_schema = entry
        writer.write_table(table.cast(out_schema))
        with self._lock:
            self._rows[kind] = self._rows.get(kind, 0) + table.num_rows
        return True

    def _join(self, *, stop: bool) -> None:
        """The pool's appends done (``stop``: the part each is on, the rest dropped), its
        threads ended."""
        with self._lock:
            if stop:
                self._stop.set()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=stop)

    def finish(self, results: Sequence[JobResult], *,
               merged: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Every kind of ``results`` in place (streamed, or merged the whole way where it could
        not be); returns (and fills, kind by kind) kind → rows and folder."""
        merged = {} if merged is None else merged
        self._tail = True
        try:
            self._join(stop=False)
            if {r.job_id for r in results} != self._added or self._error is not None or any(self._early.values()):
                self._whole = set(self._parts)  # not what it was given: from the parts alone
            self._close_writers()
            for kind in sorted(self._parts):
                if kind in self._whole:
                    _merge_all(self.out, {kind: self._parts[kind]}, merged)
                else:
                    tmp = self.out / f".{kind}.merging"
                    tmp.mkdir(parents=True, exist_ok=True)
                    _install_recorded(self.out, kind, tmp, self._rows.get(kind, 0), merged, streamed=True)
        finally:
            self.abort()
        return merged

    def _close_writers(self) -> None:
        writers, self._writers = self._writers, {}
        for writer, _ in writers.values():
            with contextlib.suppress(Exception):
                writer.close()

    def abort(self) -> None:
        """Stop (a Ctrl-C): the threads end after the part each is on, temporary folders removed."""
        self._join(stop=True)
        self._close_writers()
        for kind in self._parts:
            shutil.rmtree(self.out / f".{kind}.merging", ignore_errors=True)


MERGE_THREADS = min(8, os.cpu_count() or 1)
"""Threads appending chains side by side (threaded :class:`StreamingMerge`): a few are enough
to overlap the reads, encodes and writes of the parts left after the last job."""
MERGE_NICE = 10
"""The merge threads' nice value (Linux), above the workers' 0."""


def _yield_to_workers() -> None:
    """Lower this thread's priority (Linux: a thread's own nice value): where the workers
    use every core, the merge takes what they leave instead of the next job's set-up and
    replay (on the loaded 2-core dev VM a job's set-up inside a batch was 15-35 ms beside the
    merge, against 10 ms alone); it has a whole job's time to append the parts before."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MERGE_NICE)


def chain_index(job_id: str) -> tuple[str, int]:
    """(chain, index) of a job id ``CHAIN/0003``; another id is a chain of its own."""
    chain, _, index = job_id.rpartition("/")
    return (chain, int(index)) if chain and index.isdigit() else (job_id, 0)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM held back for the few lines inside, then raised again (main thread
    only: Python runs signal handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if got:
            signal.raise_signal(got[0])


def _install(tmp: Path, folder: Path) -> None:
    """``tmp`` renamed to ``folder``, replacing an older merge."""
    old = folder.parent / f".{folder.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _merge_kind(kind: str, parts: list[tuple[str, str]], tmp: Path) -> int:
    """One kind's parts written into ``tmp`` (a folder), part by part; returns the rows written.

    Streaming: a symbol's parts are appended to its file one at a time (one row group or more
    per part), so memory holds one job's output of the kind, never the whole kind. Parts are
    taken in chain order; if one is not in time order, or starts before the one before it
    ends, that symbol is written again from an in-memory stable sort (the rows of one symbol:
    the old way, which the plan's overlap check makes the rare case)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    paths = [p for _, p in sorted(parts) if pq.read_metadata(p).num_rows]
    if not paths:
        return 0
    schemas = [pq.read_schema(p) for p in paths]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    if all("symbol" in s.names for s in schemas):
        rows = 0
        for sym, sym_paths in _symbols_of(paths).items():
            # Hive partition values are URI-encoded (pyarrow.dataset decodes them): a
            # symbol such as EUR/USD is one folder, symbol=EUR%2FUSD, not two
            part = tmp / f"symbol={quote(sym, safe='')}"
            part.mkdir()
            rows += _write_parts(sym_paths, schema, part / "part-0.parquet", symbol=sym)
        return rows
    return _write_parts(paths, schema, tmp / "part-0.parquet", symbol=None)


def _symbols_of(paths: list[str]) -> dict[str, list[str]]:
    """Symbol → the parts holding its rows (in the given order), symbols sorted; only the
    ``symbol`` column is read. A job's part normally holds one symbol."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        with pq.ParquetFile(p) as pf:  # not pq.read_table: its pyarrow.dataset imports pandas
            symbols = pf.read(columns=["symbol"])["symbol"].cast(pa.string())
        for name in pc.unique(symbols).to_pylist():
            groups.setdefault(name, []).append(p)
    return dict(sorted(groups.items()))


def _write_parts(paths: list[str], schema: pa.Schema, target: Path, *, symbol: str | None) -> int:
    """``paths`` (of ``symbol`` only, without its column, when given) appended to ``target``
    in order; falls back to one sorted write if the parts are not in time order together."""
    out_schema = schema.remove(schema.get_field_index("symbol")) if symbol is not None else schema
    rows, last = 0, None
    with pq.ParquetWriter(target, out_schema, use_dictionary=dictionary_columns(out_schema)) as writer:
        for p in paths:
            table = _part(p, schema, symbol)
            if "ts_ns" in table.column_names and table.num_rows:
                if table["ts_ns"].null_count:
                    break
                ts = to_numpy(table["ts_ns"])
                if (last is not None and ts[0] < last) or not (ts[1:] >= ts[:-1]).all():
                    break
                last = ts[-1]
            writer.write_table(table.cast(out_schema))
            rows += table.num_rows
        else:
            return rows
    # out of order: this symbol's rows sorted in memory (stable: ties keep the chain's order)
    table = _in_time_order(pa.concat_tables([_part(p, schema, symbol) for p in paths]))
    pq.write_table(table.cast(out_schema), target, use_dictionary=dictionary_columns(out_schema))
    return table.num_rows


def _part(path: str, schema: pa.Schema, symbol: str | None) -> pa.Table:
    """One part read and conformed to the kind's unified ``schema`` (:func:`_conform`)."""
    with pq.ParquetFile(path) as pf:
        return _conform(pf.read(), schema, symbol)


def _conform(table: pa.Table, schema: pa.Schema, symbol: str | None) -> pa.Table:
    """``table`` conformed to the kind's unified ``schema`` (a column a part lacks is null;
    the ``symbol`` column dropped, its rows of ``symbol`` only, when given)."""
    if symbol is not None:
        symbols = table["symbol"].cast(pa.string())
        wanted = scalar(symbol, pa.string())  # not a str: pyarrow would import pandas for it
        if pc.any(pc.not_equal(symbols, wanted)).as_py():
            table = table.filter(pc.equal(symbols, wanted))
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    table = pa.Table.from_arrays(columns, schema=schema)
    return table.drop_columns(["symbol"]) if symbol is not None else table


def _in_time_order(table: pa.Table) -> pa.Table:
    """``table`` sorted by ``ts_ns`` (stable; as it is when already in order)."""
    if "ts_ns" not in table.column_names or table.num_rows < 2:
        return table
    ts = to_numpy(table["ts_ns"])
    if not table["ts_ns"].null_count and (ts[1:] >= ts[:-1]).all():
        return table
    keys = [(k, "ascending") for k in ("symbol", "ts_ns") if k in table.column_names]
    return table.take(pc.sort_indices(table, sort_keys=keys))


def summarise(chains: Sequence[Chain], results: Sequence[JobResult], failures: dict[str, str],
              merged: dict[str, dict[str, Any]], *, meta: dict[str, Any],
              unplanned: Sequence[str] = ()) -> dict[str, Any]:
    """The batch's summary: per file, per job, per chain and totals; accounting checked.
    ``unplanned``: files the plan did not reach (it was stopped), listed ``not_run``."""
    done = {f: (res, res.accounting[f]) for res in results for f in res.files}
    files: dict[str, dict[str, Any]] = {}
    chain_rows = []
    for chain in chains:
        error = failures.get(chain.key) or ""
        for info in chain.files:
            if info.path in done:
                res, counts = done[info.path]
                files[info.path] = {"symbol": chain.symbol, "status": "done", "job": res.job_id,
                                    **{k: int(counts[k]) for k in COUNTS},
                                    "by_reason": dict(counts.get("by_reason", {}))}
            else:
                # the file an error names failed; the chain's files after it were not run
                status = "failed" if info.path in error or info.error else "not_run"
                files[info.path] = {"symbol": chain.symbol, "status": status,
                                    **dict.fromkeys(COUNTS, 0), "by_reason": {}}
                if info.error:
                    files[info.path]["error"] = info.error
        n_done = sum(1 for i in chain.files if i.path in done)
        chain_rows.append({"symbol": chain.symbol, "files": len(chain.files), "done": n_done,
                           "status": "failed" if chain.key in failures else
                           ("done" if n_done == len(chain.files) else "incomplete"),
                           "error": failures.get(chain.key), "trace_every": chain.trace_every,
                           "overrides": chain.overrides})
    for path in unplanned:
        files[path] = {"symbol": None, "status": "not_run", **dict.fromkeys(COUNTS, 0), "by_reason": {}}
    totals = {k: sum(f[k] for f in files.values()) for k in COUNTS}
    for k in ("processed", "failed_in_stages", "failed_batches"):
        totals[k] = sum(r.ticks[k] for r in results)
    unbalanced = [p for p, f in files.items() if f["read"] != f["delivered"] + f["rejected"] + f["quarantined"]]
    closes = not unbalanced and totals["read"] == totals["delivered"] + totals["rejected"] + totals["quarantined"]
    return {
        **meta,
        "files": files,
        "chains": chain_rows,
        "jobs": [{"job": r.job_id, "files": list(r.files), "pid": r.pid, "cpu": r.cpu, "wall_s": r.wall_s,
                  "run_s": r.run_s, "phases": r.phases, "cpu_s": r.cpu_s, "ticks": r.ticks, "outputs": r.outputs, "out_dir": r.out_dir}
                 for r in results],
        "totals": totals,
        "accounting_closes": closes,
        "unbalanced_files": unbalanced,
        "outputs": merged,
        "failed": [{"symbol": k, "error": v} for k, v in sorted(failures.items())],
    }


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    path = out / "summary.json"
    write_atomic(path, orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path
