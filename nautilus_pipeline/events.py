"""The domain vocabulary: tick layouts, ticks and signals.

Ticks travel in batches as a *struct of arrays* inside a buffer-pool slab (see
``memory.py``), never as one Python object per tick on the hot path. The layout of those
arrays is fixed here, once, so that readers, stages and sinks agree on names, dtypes and
units:

- timestamps are ``int64`` nanoseconds since the Unix epoch (UTC);
- prices are ``float64`` in the quote currency; sizes ``float64`` in base units
  (contracts for inverse/COIN-M instruments, as the venue reports them);
- ``side`` is the aggressor: ``+1`` buyer-initiated, ``-1`` seller-initiated, ``0`` unknown;
- ``kind`` tells trades (``0``) from quotes (``1``) and order-book level deltas (``2``) so
  that all share one stream; columns that do not apply to a row's kind hold NaN (floats) or
  ``-1`` (ids). A book row (``KIND_BOOK``) sets one price level: ``side`` is the *book* side
  (``+1`` bid, ``-1`` ask), ``price`` the level, ``size`` its new total (``0`` removes it);
  ``side = 0`` with a NaN price clears the symbol's book (a snapshot follows). A book row's
  ``trade_id`` (no trade id there) marks exchange events: ``1`` on the last row of an event
  (Databento MBO ``F_LAST``), ``0`` inside one (the book is in transition), ``-1`` where the
  source has no event flags (every row complete). The ``book`` stage (``stages/book.py``)
  keeps the books, writes the top of book into ``bid``/``ask`` and, by default
  (``publish = "event"``), gives every row the book of its symbol's last completed event.

``TradeTick``/``QuoteTick``/``Signal`` are the per-event objects users see at the edges
(publishing from their own feed, reading signals); they convert to and from the arrays.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import ConfigError


class ColumnSpec(NamedTuple):
    """One named column of a slab: dtype and the per-row shape (``()`` for scalars).

    ``labels`` names the entries of a per-row vector (the features column's feature names),
    so a later stage learns what it reads from the column, not from the stage that wrote it."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...] = ()
    fill: float | int = 0
    labels: tuple[str, ...] = ()


KIND_TRADE = 0
KIND_QUOTE = 1
KIND_BOOK = 2

class AggressorSide(enum.IntEnum):
    """Who took liquidity in a trade: the ``side`` of a :class:`TradeTick` (an int8 column).

    Not to be confused with :class:`Side`, the direction of a :class:`Signal`.
    """

    BUY = 1
    SELL = -1
    UNKNOWN = 0


SIDE_BUY = AggressorSide.BUY.value
SIDE_SELL = AggressorSide.SELL.value
SIDE_UNKNOWN = AggressorSide.UNKNOWN.value

TICK_COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("ts_ns", np.dtype(np.int64)),  # event time (exchange), ns since epoch
    ColumnSpec("ts_recv_ns", np.dtype(np.int64), fill=-1),  # local receive time, -1 if unknown
    ColumnSpec("symbol_id", np.dtype(np.uint32)),
    ColumnSpec("kind", np.dtype(np.uint8)),
    ColumnSpec("price", np.dtype(np.float64), fill=np.nan),  # trades: trade price
    ColumnSpec("size", np.dtype(np.float64), fill=np.nan),  # trades: trade size
    ColumnSpec("side", np.dtype(np.int8)),
    ColumnSpec("trade_id", np.dtype(np.int64), fill=-1),
    ColumnSpec("bid", np.dtype(np.float64), fill=np.nan),  # quotes: top of book
    ColumnSpec("ask", np.dtype(np.float64), fill=np.nan),
    ColumnSpec("bid_size", np.dtype(np.float64), fill=np.nan),
    ColumnSpec("ask_size", np.dtype(np.float64), fill=np.nan),
)
"""The input columns every slab carries; stages add their output columns when built."""

TICK_COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in TICK_COLUMNS)


@dataclass(frozen=True, slots=True)
class TradeTick:
    """One trade. ``side`` is the aggressor: :class:`AggressorSide` or +1 buy, −1 sell, 0 unknown."""

    symbol: str
    ts_ns: int
    price: float
    size: float
    side: int = SIDE_UNKNOWN
    trade_id: int = -1
    ts_recv_ns: int = -1

    def __post_init__(self) -> None:
        if self.side not in (1, -1, 0):  # an IntEnum compares equal to its value
            raise ConfigError(
                f"TradeTick.side is the aggressor, AggressorSide.BUY/SELL/UNKNOWN (+1/-1/0), "
                f"got {self.side!r}" + (" (Side is a signal's direction)"
                                        if isinstance(self.side, Side) else "")
            )


@dataclass(frozen=True, slots=True)
class QuoteTick:
    """Top of book: best bid/ask prices and sizes."""

    symbol: str
    ts_ns: int
    bid: float
    ask: float
    bid_size: float
    ask_size: float
    ts_recv_ns: int = -1


class Side(enum.StrEnum):
    """The direction of a :class:`Signal` (not a trade's aggressor: :class:`AggressorSide`)."""

    BUY = "BUY"
    SELL = "SELL"
    FLAT = "FLAT"


@dataclass(frozen=True, slots=True)
class Signal:
    """What the pipeline tells a trader: go long, short or flat, how strongly, and why."""

    ts_ns: int
    symbol: str
    side: Side
    strength: float
    target_position: float
    reasons: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class VpinBucket:
    """A completed VPIN volume bucket (see ``kernels/vpin.py`` for the definition)."""

    symbol: str
    bucket: int
    ts_ns: int
    buy_volume: float
    sell_volume: float
    vpin: float  # NaN until `window` buckets exist
    cdf: float  # empirical CDF of VPIN so far, at this bucket's VPIN
    toxic: bool


@dataclass(frozen=True, slots=True)
class RiskEvent:
    """A limit breach (the kill switch is now on), or a Value-at-Risk report."""

    ts_ns: int
    symbol: str
    kind: str  # "breach" or "var"
    position: float
    equity: float
    drawdown: float
    breaches: tuple[str, ...] = ()
    var: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PortfolioEvent:
    """One portfolio bar (see ``kernels/portfolio.py``): weights, factors and VaR.

    Vectors are in ``symbols`` order (sorted names); variances and VaR in log-return units
    (VaR over the stage's ``horizon_bars``), keyed by level (``"0.95"``). ``factor_1`` is the
    first eigenvector (the loadings of the largest factor); NaN weights where ``singular``.
    """

    ts_ns: int  # bar end
    pipeline: str
    symbols: tuple[str, ...]
    weights_min_var: tuple[float, ...]
    weights_target: tuple[float, ...]
    eigenvalues: tuple[float, ...]
    explained_variance: tuple[float, ...]
    factor_1: tuple[float, ...]
    volatility: tuple[float, ...]  # per-bar standard deviation of each symbol's return
    variance_min_var: float
    variance_target: float
    var_min_var: dict[str, float] = field(default_factory=dict)
    var_target: dict[str, float] = field(default_factory=dict)
    singular: bool = False
