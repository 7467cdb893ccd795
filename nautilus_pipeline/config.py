"""Pipeline definitions in TOML: load, validate, build.

A definition names its sources, its stages in order (each with parameters and a compute
stream preference list), batching, and outputs. It is validated on load and every error
names the file, the key and what is allowed: a typo in a key is an error (with a "did you
mean"), never silently ignored. See ``pipelines/README.md`` for the schema and
``pipelines/*.toml`` for ready-to-run examples.

Why hand-written validation rather than a schema library: the schema is small, and the
messages (file, dotted key, allowed keys, closest match) matter more than generality. A
stage's keys are not written here: they are read off its ``Params`` dataclass
(:mod:`nautilus_pipeline.params`), so a stage is defined once.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, PipelineError
from .params import Key, build_params, schema_of, take

if TYPE_CHECKING:
    from .io import Replay, Source
    from .pipeline import Pipeline
    from .stage import Stage
    from .symbols import SymbolTable

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
PACKAGE_MODELS = Path(__file__).resolve().parent / "models"
PACKAGE_PIPELINES = Path(__file__).resolve().parent / "pipelines"
"""The bundled definitions (the checkout's top-level ``pipelines/`` links here)."""


def bundled_pipelines() -> list[str]:
    """Names of the definitions shipped with the package (``default``, ``vpin``, ...)."""
    return sorted(p.stem for p in PACKAGE_PIPELINES.glob("*.toml"))


def find_definition(name: str | Path) -> Path:
    """A definition file: a path that exists, else a bundled definition by name
    (``default``, ``default.toml``, or ``package:default``), so that
    ``nautilus-pipeline run default`` works from any folder after ``pip install``."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists() or (path.suffix == ".toml" and len(path.parts) > 1 and not text.startswith("package:")):
        return path
    stem = text.removeprefix("package:").removesuffix(".toml")
    bundled = PACKAGE_PIPELINES / f"{stem}.toml"
    if "/" not in stem and bundled.exists():
        return bundled
    return path


MAX_BATCH_SIZE = 1 << 24
"""Largest ``batch_size`` (rows per slab); the pool's memory is checked against the machine too."""
MAX_SLABS = 4096


def check_batch_size(value: int, where: str) -> None:
    """A ConfigError unless ``1 <= value <= MAX_BATCH_SIZE`` (also used for the CLI's --batch)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_SIZE:
        raise ConfigError(f"{where} must be an integer from 1 to {MAX_BATCH_SIZE:,}, got {value!r}")


def _check_pipeline(pipeline: dict[str, Any], source: str) -> None:
    """Ranges of the [pipeline] settings: refused here, not as a MemoryError or at the first tick."""
    check_batch_size(pipeline["batch_size"], f"{source}: pipeline.batch_size")
    if not 1 <= pipeline["slabs"] <= MAX_SLABS:
        raise ConfigError(f"{source}: pipeline.slabs must be from 1 to {MAX_SLABS}, got {pipeline['slabs']}")
    if not 1 <= pipeline["queue_size"] <= 1 << 20:
        raise ConfigError(f"{source}: pipeline.queue_size must be from 1 to {1 << 20:,}, got {pipeline['queue_size']}")
    delay = pipeline["max_delay_us"]
    if not (math.isfinite(delay) and 0 <= delay <= 3.6e9):
        raise ConfigError(f"{source}: pipeline.max_delay_us must be a number of µs from 0 to 3.6e9 (an hour), got {delay}")
    if not 0 <= pipeline["cores"] <= 65_536:
        raise ConfigError(f"{source}: pipeline.cores must be >= 0 (0 = every core this process may use), got {pipeline['cores']}")
    if not 0 <= pipeline["blas_threads"] <= 4096:
        raise ConfigError(f"{source}: pipeline.blas_threads must be >= 0 (0 = leave as is), got {pipeline['blas_threads']}")
    symbols = pipeline["symbols"]
    if symbols is not None:
        bad = [x for x in symbols if not isinstance(x, str) or not x.strip()]
        if bad:
            raise ConfigError(f"{source}: pipeline.symbols must be a list of symbol names (strings), got {bad!r} in it")
        if len(set(symbols)) != len(symbols):
            raise ConfigError(f"{source}: pipeline.symbols names a symbol twice: {symbols}")


def resolve_path(value: str, base: Path) -> Path:
    """A path in a definition: ``package:NAME`` (bundled sample data), absolute, or relative
    to the definition file's folder, then to the working directory."""
    if value.startswith("package:"):
        name = value.removeprefix("package:")
        for folder in (PACKAGE_DATA, PACKAGE_MODELS):
            if (folder / name).exists():
                return folder / name
        return PACKAGE_DATA / name
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    beside = base / p
    return beside if beside.exists() or not p.exists() else p


PIPELINE_KEYS = {
    "name": Key(str, "default", "the pipeline's name, used in topics and logs"),
    "description": Key(str, "", "one line for humans"),
    "batch_size": Key(int, 4096, "rows per batch (slab capacity)"),
    "slabs": Key(int, 8, "number of slabs in the buffer pool (batches in flight)"),
    "max_delay_us": Key(float, 1000.0, "micro-batch deadline for tick-by-tick ingress"),
    "memory": Key(str, "auto", "slab memory", choices=("auto", "host", "pinned", "unified")),
    "on_error": Key(str, "isolate", "a failing stage: isolate (dead-letter) or fail_fast",
                    choices=("isolate", "fail_fast")),
    "queue_size": Key(int, 4, "batches queued per stage before upstream waits"),
    "symbols": Key(list, None, "allow-list of symbols; others are rejected"),
    "blas_threads": Key(int, 1, "BLAS threads while the pipeline runs (0 = leave as is)"),
    "execution": Key(str, "concurrent", "concurrent: large batches run on stage worker threads, "
                     "stages side by side; serial: everything on the loop thread",
                     choices=("concurrent", "serial")),
    "cores": Key(int, 0, "cores the stages may keep busy, the event loop's included: a heavy "
                 "CPU stage gets a worker thread while one is left beside the loop's "
                 "(0 = every core this process may use)"),
}

REPLAY_KEYS = {
    "speed": Key(float, 0.0, "0 = as fast as possible; N = N times faster than the market"),
    "order_by": Key(str, None, "timestamp that orders the merged stream (default per format: "
                    "event time; receive time for captures whose quotes lack it)",
                    choices=("ts_event", "ts_recv")),
}

OUTPUT_KEYS = {
    "dir": Key(str, "out", "folder for outputs (the CLI's --out overrides it)"),
    "formats": Key(list, ["jsonl", "parquet"], "jsonl and/or parquet"),
    "topics": Key(list, ["signals.>", "vpin.>", "risk.>", "portfolio.>"],
                  "bus topics written to files"),
}

TOP_KEYS = {
    "pipeline": Key(dict, {}, "pipeline settings"),
    "replay": Key(dict, {}, "replay settings"),
    "sources": Key(list, [], "tick files to replay", required=False),
    "stages": Key(list, None, "stages in order", required=True),
    "outputs": Key(dict, {}, "where results go"),
}


@dataclass
class StageDef:
    """One validated ``[[stages]]`` table: its type, class, parameters, name and streams."""

    type: str
    cls: type
    values: dict[str, Any]  # the table's keys, type-checked, defaults filled in
    name: str
    streams: tuple[str, ...]
    where: str

    @property
    def params(self) -> Any:
        """The stage's ``Params`` (its checks run here: at build, like the stage's own), or
        None for a stage class without one."""
        params_cls = getattr(self.cls, "Params", None)
        return None if params_cls is None else build_params(params_cls, self.values)


@dataclass
class PipelineDef:
    """A validated pipeline definition (what ``load`` returns and ``build`` consumes)."""

    path: Path
    pipeline: dict[str, Any]
    replay: dict[str, Any]
    sources: list[dict[str, Any]]
    stages: list[StageDef]
    outputs: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.pipeline["name"]


SOURCE_KEYS = {
    "path": Key(str, None, "tick file: relative to this file, absolute, or package:NAME",
                required=True),
    "format": Key(str, None, "reader (default: detected from the file)"),
    "symbol": Key(str, None, "instrument name for single-symbol files"),
    "name": Key(str, None, "name of the source in the accounting (default: the path)"),
    "on_bad_row": Key(str, "quarantine", "fail (stop), reject (drop and count), or "
                      "quarantine (drop, count, write the row to a side file)",
                      choices=("fail", "reject", "quarantine")),
    "quarantine": Key(str, None, "side file for quarantined rows (default: in the output dir)"),
    "allow_equal_ts": Key(bool, True, "equal timestamps within a symbol are in order"),
    "order_by": Key(str, None, "ts_event or ts_recv (default: the replay's)",
                    choices=("ts_event", "ts_recv")),
    "options": Key(dict, {}, "reader options (column mapping for generic CSV, ...)"),
}

def stage_class(type_name: str, where: str, source: str) -> type:
    """The Stage class of a ``type``: a built-in name, or ``"package.module:ClassName"``."""
    from .stage import Stage
    from .stages import STAGE_TYPES

    if ":" in type_name:
        module, _, attr = type_name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{source}: {where}.type = {type_name!r} cannot be imported "
                              f"({type(exc).__name__}: {exc})") from None
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise ConfigError(f"{source}: {where}.type = {type_name!r} is not a Stage subclass")
        return cls
    if type_name not in STAGE_TYPES:
        close = difflib.get_close_matches(str(type_name), list(STAGE_TYPES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: {where}.type = {type_name!r} is unknown{hint}; one of "
                          f"{', '.join(sorted(STAGE_TYPES))}, or a class as 'package.module:Class'")
    return STAGE_TYPES[type_name]


def stage_schema(cls: type) -> dict[str, Key]:
    """The keys a ``[[stages]]`` table of this class takes (besides ``type``)."""
    params = getattr(cls, "Params", None)
    return {
        "name": Key(str, None, "stage name (default: its type)"),
        "streams": Key(list, list(cls.streams), "compute stream preference list, first usable wins"),
        **(schema_of(params) if params is not None else {}),
    }


STAGE_DOCS_BEGIN = "<!-- stage keys: generated by scripts/gen_pipeline_docs.py from each stage's Params -->"
STAGE_DOCS_END = "<!-- end of generated stage keys -->"


def stage_reference() -> str:
    """The keys of every built-in stage type, as Markdown (the generated part of
    ``pipelines/README.md``; a test checks that it is current)."""
    from .params import schema_markdown
    from .stages import STAGE_TYPES

    return "\n".join(schema_markdown(name, cls) for name, cls in STAGE_TYPES.items())


def _stage_def(table: Any, i: int, source: str) -> StageDef:
    where = f"stages[{i}]"
    if not isinstance(table, dict) or "type" not in table:
        from .stages import STAGE_TYPES

        raise ConfigError(f"{source}: {where} needs a type; one of {', '.join(sorted(STAGE_TYPES))}")
    kind = table["type"]
    if not isinstance(kind, str):
        raise ConfigError(f"{source}: {where}.type must be a string, got {kind!r}")
    cls = stage_class(kind, where, source)
    for key, moved in getattr(cls, "MOVED_KEYS", {}).items():
        if key in table:
            raise ConfigError(f"{source}: {where}.{key} is no longer a key of a {kind!r} stage: {moved}")
    values = take({k: v for k, v in table.items() if k != "type"}, stage_schema(cls), where, source)
    streams = values.pop("streams")
    if not streams or any(not isinstance(x, str) for x in streams):
        raise ConfigError(f"{source}: {where}.streams must be a non-empty list of stream names, got {streams!r}")
    name = values.pop("name") or kind.rpartition(":")[2].lower()
    return StageDef(kind, cls, values, name, tuple(streams), where)


def loads(text: str, path: str | Path = "<string>") -> PipelineDef:
    """Parse and validate a definition from TOML text."""
    path = Path(path)
    source = str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    top = take(raw, TOP_KEYS, "(top level)", source)
    pipeline = take(top["pipeline"], PIPELINE_KEYS, "pipeline", source)
    _check_pipeline(pipeline, source)
    replay = take(top["replay"], REPLAY_KEYS, "replay", source)
    if not (math.isfinite(replay["speed"]) and replay["speed"] >= 0):
        raise ConfigError(f"{source}: replay.speed must be a number >= 0 (0 = as fast as possible), got {replay['speed']}")
    outputs = take(top["outputs"], OUTPUT_KEYS, "outputs", source)
    bad = [f for f in outputs["formats"] if f not in ("jsonl", "parquet")]
    if bad:
        raise ConfigError(f"{source}: outputs.formats has {bad}; allowed: 'jsonl', 'parquet'")
    sources = [take(s, SOURCE_KEYS, f"sources[{i}]", source) for i, s in enumerate(top["sources"])]
    if not top["stages"]:
        raise ConfigError(f"{source}: stages is empty; a pipeline needs at least one stage")
    stages = [_stage_def(t, i, source) for i, t in enumerate(top["stages"])]
    return PipelineDef(path, pipeline, replay, sources, stages, outputs)


def load(path: str | Path) -> PipelineDef:
    """Read and validate a definition file (a path, or a bundled definition's name)."""
    path = find_definition(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"pipeline definition {path} does not exist; bundled definitions: "
                          f"{', '.join(bundled_pipelines())}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline definition {path}: {exc.strerror}") from None
    return loads(text, path)


@dataclass
class BuildContext:
    """What stage factories may consult: the definition, its sources, other stages' params."""

    definition: PipelineDef
    sources: list[Source]  # of this run (the CLI's --ticks may replace the definition's)
    replay: Replay | None = None  # the run's replay: a calibration read is kept for it (read once)

    def path(self, value: str) -> Path:
        return resolve_path(value, self.definition.path.parent)

    def params_of(self, stage_type: str) -> Any:
        """The ``Params`` of the first stage of ``stage_type`` in the definition, or None."""
        for sd in self.definition.stages:
            if sd.type == stage_type:
                return sd.params
        return None

    def model_inputs(self) -> list[str] | None:
        """The input names of the inference stage's model (None without one, or when the
        model cannot be read: the inference stage's own build then says why)."""
        from .model.spec import DEFAULT_MODEL_PATH, read_input_names

        p = self.params_of("inference")
        if p is None:
            return None
        try:
            return list(read_input_names(self.path(p.model) if p.model else DEFAULT_MODEL_PATH))
        except ConfigError:
            return None

    def known_symbols(self) -> tuple[set[str], bool]:
        """Symbols the run will see, as far as they can be known before reading the data:
        the ``[pipeline] symbols`` allow-list, else each source's symbol (given, or from its
        file name), else those of its first chunk. Returns (names, complete)."""
        from .io.chunk import first_chunk

        allowed = self.definition.pipeline["symbols"]
        if allowed:
            return set(allowed), True
        names: set[str] = set()
        complete = True
        for src in self.sources:
            if src.symbol:
                names.add(src.symbol)
                continue
            reader, _ = src.open()
            if getattr(reader, "symbol", None):
                names.add(reader.symbol)
                continue
            complete = False
            first = first_chunk(reader)
            if first is not None:
                names.update(first.symbols)
        return names, complete

    def propose_bucket_volumes(self, buckets: int) -> dict[str, float]:
        """VPIN bucket volume per symbol: its total traded volume in the sources / ``buckets``."""
        import numpy as np

        from .events import KIND_TRADE
        from .io import Replay
        from .kernels.vpin import propose_bucket_volume

        if not self.sources:
            raise ConfigError("bucket_volume = 'auto' needs sources to calibrate on")
        import structlog

        structlog.get_logger("nautilus_pipeline.config").info(
            "bucket_volume_calibration", sources=[str(s.path) for s in self.sources], buckets=buckets)
        replay = self.replay if self.replay is not None else Replay(self.sources)
        volumes: dict[int, list[float]] = {}  # per symbol: the volume of each block read
        try:
            for block in replay.scan():
                trades = block["kind"] == KIND_TRADE
                for sid in np.unique(block["symbol_id"][trades]):
                    picked = trades & (block["symbol_id"] == sid)
                    volumes.setdefault(int(sid), []).append(float(block["size"][picked].sum()))
        except PipelineError as exc:
            raise type(exc)(f"reading the sources to compute bucket_volume = 'auto': {exc}") from None
        return {
            replay.symbols.name_of(sid): propose_bucket_volume(np.asarray(parts), buckets)
            for sid, parts in volumes.items()
        }


def make_sources(definition: PipelineDef, ticks: list[str] | None, out_dir: Path | None, *,
                 format: str | None = None, symbol: str | None = None,
                 order_by: str | None = None, mapping: dict | None = None) -> list[Source]:
    """``io.Source`` objects for the definition's sources, or for ``ticks`` files if given
    (``format``, ``symbol`` and a column ``mapping`` apply to those; without a mapping they take
    the definition's when all its sources share one, so ``--ticks`` does not drop it);
    ``order_by`` (``ts_event``/``ts_recv``) overrides every source's replay clock. Each source
    validates itself when made."""
    from .io import Source

    order = {"ts_event": "ts_ns", "ts_recv": "ts_recv_ns", None: None}
    if order_by not in order:
        raise ConfigError(f"order_by must be 'ts_event' or 'ts_recv', got {order_by!r}")
    default_order = definition.replay["order_by"]
    allowed = definition.pipeline["symbols"]
    if ticks:
        given = {k: v for k, v in (("format", format), ("symbol", symbol)) if v is not None}
        maps = {repr(m) for m in (t["options"].get("mapping") for t in definition.sources) if m}
        if mapping is None and len(maps) == 1 and all(t["options"].get("mapping") for t in definition.sources):
            mapping = definition.sources[0]["options"]["mapping"]
        if mapping is not None:
            given["options"] = {"mapping": mapping}
        tables = [take({"path": t, **given}, SOURCE_KEYS, f"ticks[{i}]", "--ticks")
                  for i, t in enumerate(ticks)]
        paths = [Path(t) for t in ticks]
    else:
        tables = definition.sources
        paths = [resolve_path(t["path"], definition.path.parent) for t in tables]
    from .io.nautilus import catalog_files  # a NautilusTrader catalog folder: its tick files

    pairs = [(t, f) for t, p in zip(tables, paths, strict=True)
             for f in (catalog_files(p) if p.is_dir() else [p])]
    out = []
    for i, (t, p) in enumerate(pairs):
        quarantine = t["quarantine"]
        if t["on_bad_row"] == "quarantine" and quarantine is None:
            folder = out_dir or Path(definition.outputs["dir"])
            quarantine = folder / f"quarantine-{i}-{p.name.split('.')[0]}.jsonl"
        out.append(
            Source(
                p,
                format=t["format"],
                symbol=t["symbol"],
                policy=t["on_bad_row"],
                quarantine=quarantine,
                allow_equal_ts=t["allow_equal_ts"],
                order_by=order[order_by or t["order_by"] or default_order],
                options=t["options"],
                name=t["name"],
                symbols_allowed=allowed,
            )
        )
    return out


def build_stages(definition: PipelineDef, sources: list[Source] | None = None,
                 replay: Replay | None = None) -> list[Stage]:
    """The stage objects of a definition, in order (errors name the file and stage).

    ``replay``: the run's replay of ``sources``; a stage that must read the input first
    (``bucket_volume = "auto"``) reads it through it, so the replay does not read it again."""
    ctx = BuildContext(definition, sources or [], replay)
    out = []
    for sd in definition.stages:
        try:
            params = sd.params
            if params is None:
                out.append(sd.cls(name=sd.name, streams=sd.streams))
            else:
                out.append(sd.cls.from_params(params, ctx, name=sd.name, streams=sd.streams))
        except ConfigError as exc:
            raise ConfigError(f"{definition.path}: {sd.where} ({sd.type}): {exc}") from None
        except (ValueError, TypeError, OverflowError, ZeroDivisionError) as exc:  # a parameter no check caught
            raise ConfigError(f"{definition.path}: {sd.where} ({sd.type}): a parameter is out of range "
                              f"({type(exc).__name__}: {exc}); see pipelines/README.md") from None
    return out


def build_pipeline(definition: PipelineDef, stages: list[Stage], *, batch_size: int | None = None,
                   symbols: SymbolTable | None = None, **overrides: Any) -> Pipeline:
    """The :class:`~nautilus_pipeline.pipeline.Pipeline` of a definition; keyword arguments
    override its ``[pipeline]`` settings (``None`` keeps the definition's)."""
    from .pipeline import Pipeline
    from .symbols import SymbolTable

    p = definition.pipeline
    if symbols is None:
        symbols = SymbolTable(allowed=p["symbols"]) if p["symbols"] else SymbolTable()
    settings = {
        "name": p["name"],
        "batch_size": batch_size or p["batch_size"],
        "slabs": p["slabs"],
        "memory": p["memory"],
        "max_delay_us": p["max_delay_us"],
        "queue_size": p["queue_size"],
        "on_error": p["on_error"],
        "blas_threads": p["blas_threads"] or None,
        "execution": p["execution"],
        "cores": p["cores"],
    }
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ConfigError(f"build_pipeline: unknown settings {sorted(unknown)}; use {sorted(settings)}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    check_batch_size(settings["batch_size"], f"{definition.path}: batch_size")
    _check_pool_memory(stages, settings["batch_size"], settings["slabs"], definition.path)
    try:
        return Pipeline(stages, symbols=symbols, **settings)
    except MemoryError:
        raise ConfigError(f"{definition.path}: not enough memory for {settings['slabs']} slabs of "
                          f"{settings['batch_size']:,} rows; lower batch_size or slabs") from None


def _check_pool_memory(stages: list[Stage], batch_size: int, slabs: int, where: Path) -> None:
    """Refuse a pool larger than half the machine's memory before allocating it."""
    import numpy as np

    from .events import TICK_COLUMNS

    specs = [*TICK_COLUMNS, *(c for s in stages for c in getattr(s, "writes", ()))]
    row = sum(c.dtype.itemsize * int(np.prod(c.shape or (1,))) for c in specs)
    need = row * batch_size * slabs
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return
    if need > total // 2:
        raise ConfigError(f"{where}: the buffer pool would need {need / 2**30:,.1f} GiB ({slabs} slabs × "
                          f"{batch_size:,} rows × {row} bytes) of the machine's {total / 2**30:,.1f} GiB; "
                          "lower batch_size or slabs")
