"""The report as one PNG (matplotlib, Agg): header, price, P&L, VPIN and latency panels.

Layout: a wide column of time-series panels sharing the market-time axis (UTC), and a
narrow column beside each with its numbers (the run's header, the trading figures, the
VPIN summary, the per-stage latency table), so that a reader of the picture alone has the
figures as well. Series are thinned for drawing (``data.downsample``: min/max per stride,
every fill kept); the numbers are computed on every row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import RunData, SymbolView, downsample, thin

DISPLAY_POINTS = 6000
_TAB = {"fontsize": 7.5, "family": "monospace", "va": "top"}


def _dt(ns: np.ndarray) -> np.ndarray:
    return np.asarray(ns, dtype=np.int64).astype("datetime64[ns]")


def _text_table(ax, title: str, rows: list[tuple[str, str]]) -> None:
    ax.axis("off")
    width = max((len(k) for k, _ in rows), default=0)
    body = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    ax.text(0.0, 1.0, title, fontsize=9, fontweight="bold", va="top", transform=ax.transAxes)
    ax.text(0.0, 0.90, body, transform=ax.transAxes, **_TAB)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.35")
    ax.set_yticks([])


def _price(ax, v: SymbolView) -> None:
    if v.quote_ts.size:
        i = downsample(v.bid, DISPLAY_POINTS)
        t = _dt(v.quote_ts[i])
        ax.fill_between(t, v.bid[i], v.ask[i], step="post", color="tab:blue", alpha=0.25, lw=0)
        ax.step(t, v.bid[i], where="post", color="tab:blue", lw=0.6,
                label=f"bid ({v.quote_ts.size:,} quotes)")
        ax.step(t, v.ask[i], where="post", color="tab:red", lw=0.6, label="ask")
        if not v.trade_ts.size:
            mid = (v.bid[i] + v.ask[i]) / 2
            ax.plot(_dt(v.quote_ts[i]), mid, lw=0.6, color="0.2", label="mid")
    if v.trade_ts.size:
        i = downsample(v.price, DISPLAY_POINTS, thin(v.fill_idx))
        ax.plot(_dt(v.trade_ts[i]), v.price[i], lw=0.6, color="0.15",
                label=f"trade price ({v.trade_ts.size:,} trades)")
    if v.position is not None and v.entries.size + v.exits.size:
        pos = v.position
        long_in = v.entries[pos[v.entries] > 0]
        short_in = v.entries[pos[v.entries] < 0]
        for idx, marker, color, label in ((long_in, "^", "tab:green", "long entry"),
                                          (short_in, "v", "tab:red", "short entry"),
                                          (v.exits, "x", "black", "exit")):
            if idx.size:
                shown = thin(idx)
                ax.scatter(_dt(v.trade_ts[shown]), v.price[shown], marker=marker, s=18, color=color,
                           lw=1, zorder=4, label=_marker_label(label, idx, shown))
    ax.set_ylabel(f"price ({v.ccy})")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.legend(loc="upper left", fontsize=7, framealpha=0.8, ncol=3)


def _marker_label(label: str, idx: np.ndarray, shown: np.ndarray) -> str:
    if shown.size == idx.size:
        return f"{label} ({idx.size:,})"
    return f"{label} ({idx.size:,}, {shown.size:,} drawn)"


def _position_steps(v: SymbolView) -> np.ndarray:
    """Rows that draw the position's step line: every fill (and the row before it) when
    there are few; else the thinned series (min/max per stride) so a busy run stays light."""
    n = v.position.size
    if v.fill_idx.size <= DISPLAY_POINTS:
        keep = np.concatenate([[0, n - 1], v.fill_idx, v.fill_idx - 1])
    else:
        keep = downsample(v.position, DISPLAY_POINTS)
    keep = np.unique(keep)
    return keep[(keep >= 0) & (keep < n)]


def _position(ax, v: SymbolView) -> None:
    if v.position is None:
        _no_data(ax, "no position (no risk stage)")
        ax.set_ylabel("position")
        return
    keep = _position_steps(v)
    ax.step(_dt(v.trade_ts[keep]), v.position[keep], where="post", color="tab:orange", lw=0.8)
    ax.fill_between(_dt(v.trade_ts[keep]), 0, v.position[keep], step="post", color="tab:orange",
                    alpha=0.3, lw=0)
    ax.axhline(0, color="0.6", lw=0.5)
    ax.set_ylabel("position\n(base units)")


def _pnl(ax, v: SymbolView) -> None:
    if v.pnl is None:
        _no_data(ax, "no simulated account in this pipeline (no risk stage): no P&L")
        ax.set_ylabel("P&L")
        return
    i = downsample(v.pnl, DISPLAY_POINTS, thin(v.fill_idx))
    t = _dt(v.trade_ts[i])
    fees = v.gross - v.pnl
    ax.fill_between(t, 0, -v.drawdown[i], color="tab:red", alpha=0.18, lw=0, label="drawdown")
    ax.plot(t, v.gross[i], color="tab:gray", lw=0.8, label="gross")
    ax.plot(t, -fees[i], color="tab:brown", lw=0.8, ls="--", label="fees (cumulative, −)")
    ax.plot(t, v.pnl[i], color="tab:blue", lw=1.0, label="net")
    ax.axhline(0, color="0.6", lw=0.5)
    ax.set_ylabel(f"P&L ({v.ccy})")
    ax.legend(loc="lower left", fontsize=7, framealpha=0.8, ncol=4)


def _vpin(ax, v: SymbolView, threshold: float) -> None:
    if v.vpin is None:
        _no_data(ax, "no VPIN bucket completed (no VPIN stage, or too little volume)")
        ax.set_ylabel("VPIN")
        return
    t = _dt(v.vpin_ts)
    ax.step(t, v.vpin, where="post", color="tab:purple", lw=1, label="VPIN")
    if v.toxic.any():
        ax.scatter(t[v.toxic], v.vpin[v.toxic], color="tab:red", s=14, zorder=3,
                   label=f"toxic ({int(v.toxic.sum())})")
    ax.set_ylabel("VPIN")
    ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
    ax_cdf = ax.twinx()
    ax_cdf.step(t, v.cdf, where="post", color="tab:gray", lw=0.7, alpha=0.8, label="running CDF")
    ax_cdf.axhline(threshold, ls="--", color="tab:red", lw=0.8, label=f"threshold {threshold:g}")
    ax_cdf.set_ylim(0, 1.05)
    ax_cdf.set_ylabel("CDF of VPIN")
    ax_cdf.legend(loc="lower right", fontsize=7, framealpha=0.8)


def _latency(ax, run: RunData) -> None:
    lat = run.latency
    if lat is None:
        _no_data(ax, "no latency timeline (latency.parquet): rerun with this version")
        return
    colors = dict(zip(dict.fromkeys(lat["stage"].tolist()),
                      ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                       "tab:brown", "tab:pink", "tab:olive", "tab:cyan"), strict=False))
    for stage, color in colors.items():
        m = lat["stage"] == stage
        x = lat["elapsed_s"][m]
        ax.plot(x, lat["p50_ns"][m] / 1e3, color=color, lw=1, marker="o", ms=4, label=f"{stage} p50")
        ax.plot(x, lat["p99_ns"][m] / 1e3, color=color, lw=0.8, ls="--", marker="_", ms=8)
    if len(np.unique(lat["elapsed_s"])) == 1:
        ax.text(0.02, 0.06, f"one window: every batch finished within {lat['elapsed_s'][0]:.2f} s "
                "of the start; dots p50, dashes p99", transform=ax.transAxes,
                fontsize=8, color="0.35")
    ax.set_yscale("log")
    ax.set_ylabel("µs per batch")
    ax.set_xlabel("run time (s since start): solid p50, dashed p99 of the batches in each window")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.8, ncol=3)


def _latency_rows(run: RunData) -> list[tuple[str, str]]:
    rows = [("stage", "p50 µs / p99 µs / batches")]
    for st in run.summary.get("stages", []):
        lat = st["batch_latency"]
        rows.append((f"{st['stage']}@{st['stream']}",
                     f"{lat['p50_us']:,.0f} / {lat['p99_us']:,.0f} / {st['batches']:,}"))
    p = run.summary["pool"]
    rows.append(("pool", f"high-water {p['high_water']}/{p['slabs']}, {p['acquire_waits']:,} waits"))
    return rows


def _vpin_rows(run: RunData, v: SymbolView) -> list[tuple[str, str]]:
    if v.vpin is None:
        return [("buckets", "0")]
    hours = (v.vpin_ts[-1] - v.vpin_ts[0]) / 3.6e12 if v.vpin_ts.size > 1 else 0.0
    return [
        ("buckets", f"{v.vpin.size:,}"),
        ("per hour", f"{v.vpin.size / hours:,.0f}" if hours > 0 else "-"),
        ("toxic", f"{int(v.toxic.sum()):,} ({v.toxic.mean():.0%})"),
        ("VPIN mean", f"{np.mean(v.vpin):.3f}"),
        ("VPIN max", f"{np.max(v.vpin):.3f}"),
        ("threshold", f"CDF > {run.vpin_threshold:g}"),
    ]


def write_png(run: RunData, path: Path) -> Path:
    """Draw the report and save it as ``path`` (PNG, 100 dpi)."""
    import matplotlib.pyplot as plt

    fig, _ = build_figure(run)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_figure(run: RunData):
    """The report's figure and its axes by panel name (``price``, ``position``, ``pnl``,
    ``vpin``, ``latency``, or ``message`` when there is nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    v = run.primary
    empty = run.nothing_to_draw()
    title = run.title()
    if empty:
        fig = plt.figure(figsize=(14, 5), constrained_layout=True)
        grid = fig.add_gridspec(1, 2, width_ratios=[1.3, 1])
        _text_table(fig.add_subplot(grid[0, 0]), "run", run.header())
        ax = fig.add_subplot(grid[0, 1])
        ax.axis("off")
        ax.text(0, 0.9, "\n".join(_wrap(empty, 60)), va="top", fontsize=11, color="tab:red")
        fig.suptitle(title, fontsize=12, fontweight="bold")
        return fig, {"message": ax}

    # (name, height, draw(ax), side table title, side rows), only for what the run has.
    panels = [("price", 3.0, lambda ax: _price(ax, v), "market", _market_rows(run, v))]
    if v.position is not None:
        panels.append(("position", 0.8, lambda ax: _position(ax, v), None, None))
        panels.append(("pnl", 1.8, lambda ax: _pnl(ax, v), f"figures ({v.symbol})",
                       v.figures.rows(v.ccy)))
    if v.vpin is not None:
        panels.append(("vpin", 1.5, lambda ax: _vpin(ax, v, run.vpin_threshold), "VPIN",
                       _vpin_rows(run, v)))
    missing = _missing(run, v)
    header = run.header() + ([("not drawn", "; ".join(missing))] if missing else [])
    heights = [0.2 + 0.075 * len(header), *(h for _, h, *_ in panels), 1.6]
    fig = plt.figure(figsize=(16, 3 + 1.9 * sum(heights[1:])), constrained_layout=True)
    grid = fig.add_gridspec(len(heights), 2, width_ratios=[4.2, 1], height_ratios=heights)
    _text_table(fig.add_subplot(grid[0, :]), "run", header)
    loc = mdates.AutoDateLocator()
    first = None
    axes = {}
    titles = {"price": f"{v.symbol}: price, bid/ask and entries/exits",
              "position": "position", "pnl": "simulated P&L after fees, and drawdown",
              "vpin": "VPIN, toxic buckets and the running CDF that flags them"}
    for row, (name, _, draw, side_title, side_rows) in enumerate(panels, start=1):
        ax = fig.add_subplot(grid[row, 0], sharex=first)
        first = first or ax
        axes[name] = ax
        draw(ax)
        ax.xaxis.set_major_locator(loc)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc, show_offset=True))
        ax.set_xlim(*_span(v))
        ax.grid(alpha=0.25)
        if name != "position":
            ax.set_title(titles[name], fontsize=10, loc="left")
        if side_title:
            _text_table(fig.add_subplot(grid[row, 1]), side_title, side_rows)
    ax.set_xlabel("market time (UTC)")
    ax_lat = fig.add_subplot(grid[len(heights) - 1, 0])
    _latency(ax_lat, run)
    ax_lat.set_title("per-stage batch latency over the run", fontsize=10, loc="left")
    ax_lat.grid(alpha=0.25, which="both")
    _text_table(fig.add_subplot(grid[len(heights) - 1, 1]), "latency (whole run)", _latency_rows(run))
    fig.suptitle(title, fontsize=13, fontweight="bold")
    axes["latency"] = ax_lat
    return fig, axes


def _market_rows(run: RunData, v: SymbolView) -> list[tuple[str, str]]:
    rows = [("span", run.market_span()), ("trades", f"{v.trade_ts.size:,} traced"),
            ("quotes", f"{v.quote_ts.size:,} traced"), ("units", v.ccy)]
    if v.quote_ts.size:
        rows.append(("median spread", f"{np.median(v.ask - v.bid):,.4g} {v.ccy}"))
    for o in run.views:
        if o is not v:
            f = o.figures
            rows.append((o.symbol, "not drawn" if f is None else
                         f"not drawn; net {f.net_pnl:,.2f} {o.ccy}, {f.fills:,} fills"))
    return rows


def _missing(run: RunData, v: SymbolView) -> list[str]:
    """The panels this run cannot have, and why (said in the header, not drawn empty)."""
    out = []
    if not v.trade_ts.size:
        out.append("trades (none in the input: quotes only)")
    has_risk = any(st["stage"] == "risk" for st in run.summary.get("stages", []))
    if v.position is None:
        out.append("position and P&L (" + ("no trade to fill on" if has_risk
                                          else "no risk stage in this pipeline") + ")")
    if v.vpin is None:
        out.append("VPIN (no bucket completed, or no VPIN stage)")
    if not v.quote_ts.size:
        out.append("bid/ask (no quotes in the input)")
    if run.latency is None:
        out.append("latency over time (no latency.parquet: a run by an older version)")
    return out


def _span(v: SymbolView) -> tuple[np.datetime64, np.datetime64]:
    ts = np.concatenate([v.trade_ts, v.quote_ts])
    return _dt(ts.min()), _dt(ts.max())


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)
