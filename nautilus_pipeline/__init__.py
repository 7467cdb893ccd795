"""nautilus_pipeline: an asyncio, event-driven, in-process pipeline for market-data ticks.

``ticks → features → inference → VPIN / risk → signal``, each stage on a compute stream
(numpy, torch, MLX, Core ML), batches carried between stages in pooled slabs without
copies. What users import is listed here; everything else is internal.
"""

from .app import Run, Summary, TickCounts
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
from .io import Replay, Source, detect_format
from .memory import BufferPool, Lease
from .pipeline import Pipeline
from .runtime import configure_logging, run
from .stage import Stage, StageContext
from .symbols import SymbolTable

__version__ = "0.1.0"

__all__ = [
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
    "Source",
    "Stage",
    "StageContext",
    "StageError",
    "Subscription",
    "Summary",
    "SymbolTable",
    "TickCounts",
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
