"""The plan of a batch: files grouped by symbol, each symbol's files in time order, as chains.

A chain is one symbol's files, replayed one job per file, the state of each job carried into
the next (:mod:`nautilus_pipeline.snapshot`), so that the chain gives what one run over the
concatenation of its files gives. Chains are independent and run in parallel.

What is read here: the first chunk of each file (its symbol when the file name does not say
it, and its first timestamp, which orders the chain). A file that cannot be read even that
far is not dropped: its chain is planned as failed, naming the file, and the other chains
run (the policy of issue 10: one unreadable file fails that symbol's job, exit code 4).

``bucket_volume = "auto"`` is a property of the whole input (its volume / buckets), so it is
worked out per chain over all its files (:func:`calibrate_chain`, run by the executor)
before the chain's first job, the same number one sequential run over those files uses. A
chain of one file has its job work it out (:func:`calibrates_in_job`), as that one run does:
reading the file once, not once for the calibration and again for the replay. A chain of
several files reads them twice on its first batch; its answer is kept in the calibration
cache (:mod:`nautilus_pipeline.calibration_cache`), keyed by the files as they are now and
what decides the rows read from them (:func:`_calibration_inputs`), so a batch run again
over the same files (other stage parameters or workers, say) reads them once.

Overlap. One sequential run over a symbol's files merges them by time (ties by file order);
a chain replays them one after the other. The two agree only when each file starts at or
after the last tick of the file before it (a tie at the boundary goes to the earlier file in
both). A file's last tick is known only once it has been read, so the check is made between
jobs (:func:`check_follows`): the job before returns its last key, and a file that starts
before it fails its chain naming both files (exit 4; the files before it are merged, the
files after it not run), instead of a merge that would silently differ from one run. Reading
every file's end while planning was the alternative: cheap for a plain CSV (a seek), but a
second full decompression for a ``.gz`` or ``.zst`` day, done by the driver alone.
"""

from __future__ import annotations

import dataclasses
import glob
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import config
from ..errors import ConfigError, DataError, PipelineError
from ..io.checks import Policy


class InputError(ConfigError):
    """The set of input files is unusable as a whole (a pattern matches nothing, mixed formats)."""


PLAN_BLOCK_BYTES = 1 << 16
"""Bytes of a text file read to plan it (its first timestamp, its symbol)."""
TRACE_POINTS = 200_000
"""About this many trace rows per chain (as ``run`` keeps per run)."""


@dataclass(frozen=True)
class FileInfo:
    """One input file as planned: its symbol, format and first timestamp (ns), or the error
    that kept it from being read."""

    path: str
    symbol: str
    format: str | None
    first_ts_ns: int | None  # the replay's order key (``ts_ns`` or ``ts_recv_ns``), as replayed
    error: str | None = None


@dataclass(frozen=True)
class JobSpec:
    """One job: a run of a chain's consecutive files (one file by default)."""

    job_id: str
    chain: str
    index: int
    files: tuple[str, ...]
    last: bool
    first_ts_ns: int | None = None  # its first file's first key, from the plan


class OverlapError(DataError):
    """A chain's file starts before the last tick of the file before it."""


def check_follows(last: tuple[str | None, int | None] | None, spec: JobSpec) -> None:
    """Refuse ``spec`` if its first tick comes before ``last`` (the file and key of the chain's
    last tick so far; see the module doc: a chain equals one merged run only when its files do
    not overlap)."""
    if last is None or last[1] is None or spec.first_ts_ns is None or spec.first_ts_ns >= last[1]:
        return
    previous_file, previous_last_ns = last
    raise OverlapError(
        f"{spec.files[0]}: starts at {spec.first_ts_ns} ns, before the last tick of {previous_file} "
        f"({previous_last_ns} ns): files of one symbol ({spec.chain}) overlap in time, so a chain of "
        "them would not equal one run over them; remove the duplicate file, or merge the two into one",
        file=spec.files[0], reason="files_overlap")


@dataclass
class Chain:
    """One symbol's files in time order, and the settings every job of it shares."""

    symbol: str
    files: list[FileInfo]
    trace_every: int = 1
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None  # planned as failed: a file could not be read

    @property
    def key(self) -> str:
        return self.symbol

    def jobs(self) -> list[JobSpec]:
        n = len(self.files)
        return [JobSpec(f"{self.symbol}/{i:04d}", self.symbol, i, (f.path,), i == n - 1, f.first_ts_ns)
                for i, f in enumerate(self.files)]


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named or matched by ``patterns`` (globs, ``**`` recursive), each once, in order.
    A pattern that matches nothing is an error naming it (a typo would otherwise drop a day)."""
    out: dict[str, Path] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            hits = sorted(p for p in glob.glob(pattern, recursive=True) if not Path(p).is_dir())
            if not hits:
                raise InputError(f"{pattern}: the pattern matches no file")
        else:
            hits = [pattern]
        for h in hits:
            out.setdefault(str(Path(h).resolve()), Path(h))
    if not out:
        raise InputError("no input files given")
    return list(out.values())


def _symbol_from_name(path: Path) -> str | None:
    from ..io.binance import symbol_from_name

    return symbol_from_name(path)


def inspect_file(definition: config.PipelineDef, path: Path, *, format: str | None = None,
                 symbol: str | None = None) -> FileInfo:
    """The symbol, format and first timestamp of one file (its first chunk), or its error."""
    from ..io.chunk import first_chunk
    from ..io.files import check_file

    try:
        check_file(path)
        (src,) = config.make_sources(definition, [str(path)], None, format=format, symbol=symbol)
        fmt = src.resolved_format()
        reader, validator = src.open()
        options = getattr(reader, "options", None)
        if dataclasses.is_dataclass(options) and hasattr(options, "block_size"):
            # the first rows only: a CSV reader's default block is 8 MB, most of a day's file
            reader.options = dataclasses.replace(options, block_size=PLAN_BLOCK_BYTES)
        name = symbol or getattr(reader, "symbol", None)
        first = first_chunk(reader)
        if first is None or not first.columns["ts_ns"].size:
            raise DataError(f"{path}: no rows to replay")
        ts = first.column(validator.order_by)
        good = ts if first.bad is None else ts[first.bad == 0]
        if name is None:
            names = sorted(set(first.symbols))
            if len(names) != 1:
                raise ConfigError(f"{path}: holds several symbols {names}; a batch replays one symbol "
                                  "per file (split the file, or pass --symbol for a one-symbol file)")
            name = names[0]
        return FileInfo(str(path), str(name), fmt, int(good.min()) if good.size else None)
    except (PipelineError, OSError, ValueError) as exc:
        if isinstance(exc, ConfigError) and "several symbols" in str(exc):
            raise
        text = f"{exc.strerror or exc}: {path}" if isinstance(exc, OSError) else str(exc)
        if str(path) not in text:
            text = f"{path}: {text}"
        return FileInfo(str(path), symbol or _symbol_from_name(path) or Path(path).name, None, None, text)


def plan(definition: config.PipelineDef, files: Sequence[str | Path], *, format: str | None = None,
         symbol: str | None = None, trace_every: int = 0) -> list[Chain]:
    """Chains of ``files``: grouped by symbol, ordered by first timestamp (then name).

    Files of different formats are refused (one batch, one reader; a mixed set is most often a
    glob that caught other files)."""
    infos = [inspect_file(definition, Path(f), format=format, symbol=symbol) for f in files]
    formats: dict[str, str] = {}
    for info in infos:
        if info.format is not None:
            formats.setdefault(info.format, info.path)
    if len(formats) > 1:
        listed = "; ".join(f"{fmt}: {p}" for fmt, p in formats.items())
        raise InputError(f"the input files are of mixed formats ({listed}); a batch replays files of "
                          "one format: narrow the glob or run one batch per format")
    by_symbol: dict[str, list[FileInfo]] = {}
    for info in infos:
        by_symbol.setdefault(info.symbol, []).append(info)
    chains = []
    for sym in sorted(by_symbol):
        group = sorted(by_symbol[sym], key=lambda i: (i.first_ts_ns is None, i.first_ts_ns or 0, i.path))
        bad = [i for i in group if i.error is not None]
        every = trace_every or max(1, _rows_upper_bound([i.path for i in group]) // TRACE_POINTS)
        chains.append(Chain(sym, group, trace_every=every,
                            error=bad[0].error if bad else None))
    return chains


def _rows_upper_bound(paths: Sequence[str]) -> int:
    from ..app import _rows_upper_bound as bound

    return bound([_Path(p) for p in paths])


@dataclass(frozen=True)
class _Path:
    path: str


def needs_calibration(definition: config.PipelineDef) -> list[str]:
    """Names of the stages whose ``bucket_volume`` is ``"auto"``."""
    return [sd.name for sd in definition.stages
            if sd.type == "vpin" and sd.values.get("bucket_volume") == "auto"]


def calibrates_in_job(chain: Chain) -> bool:
    """Whether the chain's ``bucket_volume = "auto"`` is left to its job (a chain of one file:
    :func:`~.job.replay_job` works it out over the file it reads anyway, the same number,
    and returns it) rather than to a calibration task before it. On a lent H200 host a
    calibration task over a 3M-trade file took 2.60 s beside 15 others
    (``docs/measurements/gpu_batch_gpu_phases_ac96238_h200.txt``), a second full read of it."""
    return len(chain.files) == 1


def calibrate_chain(definition: config.PipelineDef | str, files: Sequence[str], symbol: str, *,
                    format: str | None = None) -> dict[str, dict[str, Any]]:
    """Stage overrides for a chain: ``bucket_volume = "auto"`` worked out over all its files,
    as one sequential run over them would (its volume / ``buckets_per_source``); read from
    the calibration cache when these files, unchanged, were calibrated so before."""
    from ..calibration_cache import cached

    d = definition if isinstance(definition, config.PipelineDef) else config.load(definition)
    stages = needs_calibration(d)
    if not stages:
        return {}
    try:
        inputs = _calibration_inputs(d, files, symbol, format, stages)
    except OSError:  # a file missing or unreadable: the measurement names it (a DataError)
        return _measure_chain(d, files, symbol, format, stages)
    return cached("bucket_volume", inputs, None, lambda: _measure_chain(d, files, symbol, format, stages))


def _calibration_inputs(d: config.PipelineDef, files: Sequence[str], symbol: str, format: str | None,
                        stages: list[str]) -> dict[str, Any]:
    """What a chain's calibration depends on, besides the code and the machine: each file as
    it is now (a rewrite changes its modification time or, where a copy keeps that, its
    change time and inode), the symbol, the format, the settings :func:`config.make_sources`
    reads (the pipeline's symbols, the replay's settings, the sources' mapping), the readers'
    libraries and the buckets. Not the rest of the pipeline table: ``batch`` sets its slab
    memory by the number of workers, which does not change a row read."""
    import importlib.metadata

    stats = []
    for f in files:
        st = Path(f).stat()
        stats.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    libraries = {}
    for dist in ("pyarrow", "databento-dbn", "zstandard"):
        try:
            libraries[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            libraries[dist] = None
    buckets = {sd.name: sd.values.get("buckets_per_source") for sd in d.stages if sd.name in stages}
    return {"files": stats, "symbol": symbol, "format": format, "symbols": d.pipeline.get("symbols"),
            "replay": d.replay, "sources": [{k: v for k, v in s.items() if k != "path"} for s in d.sources],
            "libraries": libraries, "buckets": buckets}


def _measure_chain(d: config.PipelineDef, files: Sequence[str], symbol: str, format: str | None,
                   stages: list[str]) -> dict[str, dict[str, Any]]:
    # quarantined rows are the run's to write (into its output folder): here they are only
    # left out, as the run leaves them out of its volume; "fail" stays "fail"
    sources = [dataclasses.replace(src, policy="reject", quarantine=None) if src.policy is Policy.QUARANTINE
               else src for src in config.make_sources(d, list(files), None, format=format, symbol=symbol)]
    ctx = config.BuildContext(d, sources, None)
    out = {}
    for name in stages:
        sd = next(s for s in d.stages if s.name == name)
        volumes = ctx.propose_bucket_volumes(int(sd.values["buckets_per_source"]))
        bad = {k: v for k, v in volumes.items() if not (math.isfinite(v) and v > 0)}
        if bad or not volumes:
            raise DataError(f"{files[0]}: bucket_volume = 'auto' found no traded volume for {symbol} "
                            f"in {len(files)} files")
        out[name] = {"bucket_volume": {k: float(np.float64(v)) for k, v in volumes.items()}}
    return out


def with_overrides(definition: config.PipelineDef, overrides: dict[str, dict[str, Any]]) -> config.PipelineDef:
    """A copy of ``definition`` with stage keys replaced (by stage name)."""
    if not overrides:
        return definition
    stages = [dataclasses.replace(sd, values={**sd.values, **overrides.get(sd.name, {})})
              for sd in definition.stages]
    return dataclasses.replace(definition, stages=stages)
