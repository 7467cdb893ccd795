"""What a report shows, computed from what ``nautilus-pipeline run`` wrote, before any drawing.

A run folder holds ``summary.json`` (counters, stages, pool, machine), ``trace.parquet``
(sampled trade and quote rows with the stages' columns, and every fill), ``latency.parquet``
(per-stage latency windows, see ``timeline.py``) and the sinks' ``signals``/``vpin``/``risk``
tables. :func:`load_run` reads them into :class:`RunData`; every part may be missing (a
VPIN-only run has no position, a quotes-only file no trades) and the drawing code asks
``RunData`` what exists instead of assuming it.

The trading figures come from the simulated account in the trace (see ``kernels/risk.py``):
a *fill* is a trade row where the position differs from the previous row's, at that row's
price; its fee is ``fee_rate·|q|·price + fee_per_order`` with the run's fee settings from
the summary, so ``gross = net + fees``. A *round trip* opens when the position leaves zero
and closes when it returns to zero or flips sign; its P&L is the net P&L between those rows,
and the hit rate is the share of round trips with a positive P&L. Exposure time is the
share of the traced time span with a non-zero position. Money is in the quote currency.
The trace keeps every fill and each symbol's last trade, so fills, fees, turnover, round
trips and net P&L are exact however sparse its sampling (``run --trace-every``); the max
drawdown is over the traced rows, so a sparse trace can miss a trough between two of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..errors import DataError
from .timeline import TIMELINE_FILE

_QUOTE_CURRENCIES = ("USDT", "USDC", "BUSD", "FDUSD", "USD", "EUR", "GBP", "JPY", "CHF",
                     "AUD", "CAD", "BTC", "ETH")


def quote_currency(symbol: str) -> str | None:
    """The quote currency of a symbol name (``BTCUSDT-PERP`` → ``USDT``, ``USDJPY`` → ``JPY``),
    or None when the name does not say (futures such as ``ESU4``)."""
    base = symbol.upper().split("-")[0].replace("/", "").replace("_PERP", "")
    for ccy in _QUOTE_CURRENCIES:
        if base.endswith(ccy) and len(base) > len(ccy):
            return ccy
    return None


def _read_parquet(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if table.num_rows == 0:
        return None
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if col.type.num_fields or str(col.type).startswith("list"):
            continue  # nested columns (VaR reports, reasons): not drawn
        out[name] = col.to_numpy(zero_copy_only=False)
    return out


@dataclass
class Figures:
    """The trading figures of one symbol's simulated account (money in quote currency)."""

    symbol: str
    net_pnl: float
    gross_pnl: float
    fees: float
    max_drawdown: float
    fills: int
    round_trips: int
    hit_rate: float  # NaN without a closed round trip
    turnover: float
    exposure: float  # share of the traced span with a position, 0..1

    def rows(self, ccy: str) -> list[tuple[str, str]]:
        hit = "-" if np.isnan(self.hit_rate) else f"{self.hit_rate:.0%}"
        return [
            ("net P&L", f"{self.net_pnl:,.2f} {ccy}"),
            ("gross P&L", f"{self.gross_pnl:,.2f} {ccy}"),
            ("fees paid", f"{self.fees:,.2f} {ccy}"),
            ("max drawdown", f"{self.max_drawdown:,.2f} {ccy}"),
            ("fills", f"{self.fills:,}"),
            ("round trips", f"{self.round_trips:,}"),
            ("hit rate", hit),
            ("turnover", f"{self.turnover:,.0f} {ccy}"),
            ("exposure time", f"{self.exposure:.0%}"),
        ]


@dataclass
class SymbolView:
    """One symbol's series, sorted by time (ns since the epoch, UTC)."""

    symbol: str
    ccy: str  # "USDT", or "quote currency" when the name does not say
    trade_ts: np.ndarray
    price: np.ndarray
    quote_ts: np.ndarray
    bid: np.ndarray
    ask: np.ndarray
    position: np.ndarray | None = None  # on trade rows
    pnl: np.ndarray | None = None  # net, on trade rows
    gross: np.ndarray | None = None
    drawdown: np.ndarray | None = None
    fill_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    entries: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    exits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    figures: Figures | None = None
    vpin_ts: np.ndarray | None = None
    vpin: np.ndarray | None = None
    cdf: np.ndarray | None = None
    toxic: np.ndarray | None = None


@dataclass
class RunData:
    dir: Path
    summary: dict[str, Any]
    views: list[SymbolView]
    latency: dict[str, np.ndarray] | None
    vpin_threshold: float

    @property
    def primary(self) -> SymbolView | None:
        """The symbol drawn in the charts: the one with the most trades (or quotes)."""
        if not self.views:
            return None
        return max(self.views, key=lambda v: (v.trade_ts.size, v.quote_ts.size))

    def title(self) -> str:
        v = self.primary
        if v is None or self.nothing_to_draw():
            return f"{self.summary['pipeline']} — nothing to draw"
        return f"{self.summary['pipeline']} — {v.symbol} — {self.market_span()}"

    def header(self) -> list[tuple[str, str]]:
        s, t = self.summary, self.summary["ticks"]
        files = s.get("files") or list(s.get("accounting", {}).get("sources", {}))
        return [
            ("pipeline", f"{s['pipeline']} ({s.get('definition', '-')})"),
            ("files", ", ".join(Path(f).name for f in files) or "-"),
            ("symbols", ", ".join(s.get("symbols", [])) or "-"),
            ("ticks", f"read {t['read']:,} · delivered {t['delivered']:,} · rejected "
                      f"{t['rejected']:,} · quarantined {t['quarantined']:,}"
                      + (" · interrupted (partial run)" if s.get("interrupted") else "")),
            ("run", f"{s['wall_s']:.2f} s, {t['ticks_per_s']:,.0f} ticks/s"),
            ("pool", f"{s['pool']['slabs']} slabs, high-water {s['pool']['high_water']}, "
                     f"{s['pool']['acquire_waits']:,} acquire waits "
                     f"({s['pool']['acquire_wait_s']:.3f} s)"),
            ("machine", s.get("machine", "-")),
            ("code version", s.get("code_version", "-")),
        ]

    def market_span(self) -> str:
        """``2024-08-08 23:54:16 – 23:59:59 UTC`` of the primary symbol, or ``-``."""
        v = self.primary
        ts = np.concatenate([v.trade_ts, v.quote_ts]) if v is not None else np.zeros(0)
        if not ts.size:
            return "-"
        a, b = (np.datetime64(int(x), "ns").astype("datetime64[s]") for x in (ts.min(), ts.max()))
        da, db = str(a).replace("T", " "), str(b).replace("T", " ")
        return f"{da} – {db[11:] if da[:10] == db[:10] else db} UTC"

    def nothing_to_draw(self) -> str | None:
        """Why there is nothing to draw (no trades, no quotes, no VPIN), or None."""
        if any(v.trade_ts.size or v.quote_ts.size for v in self.views):
            return None
        t = self.summary["ticks"]
        return (f"nothing to draw: no trade or quote reached the stages (read {t['read']:,}, "
                f"delivered {t['delivered']:,}, rejected {t['rejected']:,}, quarantined "
                f"{t['quarantined']:,}); outputs: "
                f"{', '.join(f'{k} {v:,}' for k, v in self.summary.get('outputs', {}).items()) or 'none'}")


def _figures(v: SymbolView, fees: dict[str, float] | None) -> None:
    """Fills, fees, gross P&L, round trips and the figures, from the position on trade rows."""
    pos, price, ts = v.position, v.price, v.trade_ts
    prev = np.concatenate(([0.0], pos[:-1]))
    q = pos - prev
    fill = np.flatnonzero(q != 0)
    rate = fees["fee_rate"] if fees else 0.0
    per_order = fees["fee_per_order"] if fees else 0.0
    fee = np.zeros(pos.size)
    fee[fill] = rate * np.abs(q[fill]) * price[fill] + per_order
    cum_fee = np.cumsum(fee)
    v.gross = v.pnl + cum_fee
    v.fill_idx = fill
    opened = (prev == 0) & (pos != 0)
    closed = (prev != 0) & ((pos == 0) | (np.sign(pos) != np.sign(prev)))
    v.entries = np.flatnonzero(opened | (closed & (pos != 0)))
    v.exits = np.flatnonzero(closed)
    trip_pnl = []
    open_at = None
    for i in np.flatnonzero(opened | closed):
        if closed[i] and open_at is not None:
            trip_pnl.append(v.pnl[i] - v.pnl[open_at])
            open_at = None
        if pos[i] != 0:
            open_at = i
    trips = np.asarray(trip_pnl)
    span = float(ts[-1] - ts[0]) if ts.size > 1 else 0.0
    held = float(np.sum(np.diff(ts)[pos[:-1] != 0])) if ts.size > 1 else 0.0
    v.figures = Figures(
        symbol=v.symbol,
        net_pnl=float(v.pnl[-1]),
        gross_pnl=float(v.gross[-1]),
        fees=float(cum_fee[-1]),
        max_drawdown=float(np.nanmax(v.drawdown)) if v.drawdown is not None else 0.0,
        fills=int(fill.size),
        round_trips=int(trips.size),
        hit_rate=float(np.mean(trips > 0)) if trips.size else float("nan"),
        turnover=float(np.sum(np.abs(q[fill]) * price[fill])),
        exposure=held / span if span > 0 else 0.0,
    )


def load_run(run_dir: str | Path) -> RunData:
    """Read a run's folder; raises ``DataError`` only when it is not a run folder at all."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise DataError(f"{run_dir}: no summary.json; is it the --out folder of a run?")
    try:
        summary = orjson.loads(summary_path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise DataError(f"{summary_path}: not valid JSON ({exc}); rerun the pipeline") from exc
    trace = _read_parquet(run_dir / "trace.parquet")
    vpin = _read_parquet(run_dir / "vpin.parquet")
    latency = _read_parquet(run_dir / TIMELINE_FILE)
    symbols = list(summary.get("symbols", []))
    for table in (trace, vpin):
        if table is not None:
            symbols += [s for s in dict.fromkeys(table["symbol"].tolist()) if s not in symbols]
    views = []
    for sym in symbols:
        view = _view(sym, trace, vpin, summary.get("fees"))
        if view is not None:
            views.append(view)
    return RunData(run_dir, summary, views, latency, float(summary.get("vpin_threshold", 0.9)))


def _view(sym: str, trace, vpin, fees) -> SymbolView | None:
    empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0)
    trade_ts, price, quote_ts, bid, ask = empty_i, empty_f, empty_i, empty_f, empty_f
    extra: dict[str, np.ndarray] = {}
    if trace is not None:
        mine = trace["symbol"] == sym
        kind = trace["kind"] if "kind" in trace else np.zeros(mine.size, dtype=np.uint8)
        tr = np.flatnonzero(mine & (kind == 0))
        tr = tr[np.argsort(trace["ts_ns"][tr], kind="stable")]
        trade_ts, price = trace["ts_ns"][tr], trace["price"][tr].astype(float)
        if "bid" in trace:
            qu = np.flatnonzero(mine & (kind == 1))
            qu = qu[np.argsort(trace["ts_ns"][qu], kind="stable")]
            ok = np.isfinite(trace["bid"][qu]) & np.isfinite(trace["ask"][qu])
            qu = qu[ok]
            quote_ts, bid, ask = trace["ts_ns"][qu], trace["bid"][qu], trace["ask"][qu]
        for c in ("position", "pnl", "drawdown"):
            if c in trace and tr.size and np.isfinite(trace[c][tr]).any():
                extra[c] = np.nan_to_num(trace[c][tr].astype(float))
    ccy = quote_currency(sym) or "quote currency"
    v = SymbolView(sym, ccy, trade_ts, price, quote_ts, bid, ask, **extra)
    if vpin is not None:
        rows = np.flatnonzero((vpin["symbol"] == sym) & np.isfinite(vpin["vpin"].astype(float)))
        if rows.size:
            v.vpin_ts, v.vpin = vpin["ts_ns"][rows], vpin["vpin"][rows].astype(float)
            v.cdf = vpin["cdf"][rows].astype(float)
            v.toxic = vpin["toxic"][rows].astype(bool)
    if v.position is not None and v.pnl is not None:
        _figures(v, fees)
    if not (trade_ts.size or quote_ts.size or v.vpin is not None):
        return None
    return v


MAX_MARKERS = 1500


def thin(idx: np.ndarray, n: int = MAX_MARKERS) -> np.ndarray:
    """At most ``n`` of the indices ``idx``, evenly spaced (markers for display only)."""
    if idx.size <= n:
        return idx
    return idx[np.linspace(0, idx.size - 1, n).round().astype(np.int64)]


def downsample(x: np.ndarray, n: int, *keep: np.ndarray) -> np.ndarray:
    """Indices of at most about ``n`` points of a series for display: evenly spaced, plus the
    min and max of each stride (so spikes stay visible) and the indices in ``keep`` (fills).
    The report's figures are always computed on every row; only the drawing is thinned."""
    size = x.size
    if size <= n:
        idx = np.arange(size)
    else:
        stride = int(np.ceil(size / (n / 3)))
        starts = np.arange(0, size, stride)
        trimmed = x[: starts.size * stride] if size % stride == 0 else np.concatenate(
            [x, np.full(starts.size * stride - size, np.nan)])
        blocks = trimmed.reshape(starts.size, stride)
        lo = starts + np.nanargmin(blocks, axis=1)
        hi = starts + np.nanargmax(blocks, axis=1)
        idx = np.concatenate([starts, lo, hi, [size - 1]])
    if keep:
        idx = np.concatenate([idx, *keep])
    return np.unique(idx)
