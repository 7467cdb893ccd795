"""nautilus_pipeline: an asyncio, event-driven, in-process pipeline for market-data ticks.

``ticks → features → inference → VPIN / risk → signal``, each stage on a compute stream
(numpy, torch, MLX, Core ML), batches carried between stages in pooled slabs without
copies. What users import is listed here; everything else is internal.

- Run a definition: ``Run`` (→ ``Summary``, ``TickCounts``); ``run`` (uvloop),
  ``configure_logging``.
- Build and embed: ``Pipeline`` (``TickFlow``), ``Stage`` (``NOT_NOW``), ``StageContext``, ``EventBus``,
  ``Event``, ``Subscription``, ``Overflow``, ``DeadLetter``, ``BufferPool``, ``Lease``,
  ``SymbolTable``; compute streams: ``ComputeStream``, ``choose``, ``create_stream``, ``discover``.
- Ticks and events: ``TradeTick``, ``QuoteTick``, ``AggressorSide`` (a trade's aggressor),
  ``Signal``, ``Side`` (a signal's direction), ``VpinBucket``, ``RiskEvent``,
  ``TICK_COLUMNS``, ``ColumnSpec``.
- Reading files: ``Replay``, ``Source``, ``detect_format``.
- Errors, all ``PipelineError``: ``ConfigError``, ``DataError`` (file, line, reason),
  ``StageError`` (stage, topic, batch, rows, stream), ``HandlerError``, ``WouldBlockError``,
  ``BusClosedError``, ``LeaseError``, ``PoolExhaustedError``, ``BackendUnavailableError``,
  ``RequestTimeoutError``, ``NoResponderError``, ``SnapshotError``.

Modules for more: ``nautilus_pipeline.stages`` (the built-in stages and their ``Params``),
``.testing`` (pytest fixtures), ``.topics`` (every published topic), ``.params`` (a stage's
parameters as a dataclass), ``.io`` (readers), ``.config`` (definitions), ``.batch``
(sharded batch replays: ``run_batch``, ``replay_job``), ``.snapshot`` (stage state as bytes).
"""

from typing import TYPE_CHECKING

from .bus import DeadLetter, Event, EventBus, Overflow, Subscription
from .compute import ComputeStream, choose, create_stream, discover
from .errors import (
    BackendUnavailableError,
    BusClosedError,
    ConfigError,
    DataError,
    HandlerError,
    LeaseError,
    NoResponderError,
    PipelineError,
    PoolExhaustedError,
    RequestTimeoutError,
    StageError,
    WouldBlockError,
)
from .events import (
    TICK_COLUMNS,
    AggressorSide,
    ColumnSpec,
    QuoteTick,
    RiskEvent,
    Side,
    Signal,
    TradeTick,
    VpinBucket,
)
from .memory import BufferPool, Lease
from .pipeline import Pipeline, TickFlow
from .runtime import configure_logging, run
from .snapshot import SnapshotError
from .stage import NOT_NOW, Stage, StageContext
from .symbols import SymbolTable

if TYPE_CHECKING:
    from .app import Run, Summary, TickCounts
    from .io import Replay, Source, detect_format

__version__ = "0.1.0"

# Imported on first use (PEP 562): the definitions' runner (``Run``: the config, every
# built-in stage, the model loaders) and the readers (pyarrow and every format) are ~0.2-0.4 s
# of a process's start that an app embedding a Pipeline, or a replay of one format, need not pay.
_LAZY = {"Run": "app", "Summary": "app", "TickCounts": "app",
         "Replay": "io", "Source": "io", "detect_format": "io"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

__all__ = [
    "NOT_NOW",
    "TICK_COLUMNS",
    "AggressorSide",
    "BackendUnavailableError",
    "BufferPool",
    "BusClosedError",
    "ColumnSpec",
    "ComputeStream",
    "ConfigError",
    "DataError",
    "DeadLetter",
    "Event",
    "EventBus",
    "HandlerError",
    "Lease",
    "LeaseError",
    "NoResponderError",
    "Overflow",
    "Pipeline",
    "PipelineError",
    "PoolExhaustedError",
    "QuoteTick",
    "Replay",
    "RequestTimeoutError",
    "RiskEvent",
    "Run",
    "Side",
    "Signal",
    "SnapshotError",
    "Source",
    "Stage",
    "StageContext",
    "StageError",
    "Subscription",
    "Summary",
    "SymbolTable",
    "TickCounts",
    "TickFlow",
    "TradeTick",
    "VpinBucket",
    "WouldBlockError",
    "choose",
    "configure_logging",
    "create_stream",
    "detect_format",
    "discover",
    "run",
]
