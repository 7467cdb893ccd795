"""A run's picture: price with signals, VPIN with its threshold, simulated position and P&L,
and per-stage latency histograms, as a PNG (and optionally a self-contained HTML page).

Reads what ``nautilus-pipeline run`` wrote: ``trace.parquet`` (sampled trade rows),
``signals.parquet``, ``vpin.parquet`` and ``summary.json``.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import orjson

from .errors import DataError


def _read(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def write_report(run_dir: Path, *, html_page: bool = False) -> list[Path]:
    """Draw ``run_dir/report.png`` (and ``report.html``); return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise DataError(f"{run_dir}: no summary.json; is it the --out folder of a run?")
    summary = orjson.loads(summary_path.read_bytes())
    trace = _read(run_dir / "trace.parquet")
    signals = _read(run_dir / "signals.parquet")
    vpin = _read(run_dir / "vpin.parquet")
    if trace is None:
        raise DataError(f"{run_dir}: no trace.parquet; rerun with the current nautilus-pipeline")

    symbols = list(dict.fromkeys(trace["symbol"].tolist()))
    symbol = symbols[0]
    sel = trace["symbol"] == symbol
    t = (trace["ts_ns"][sel]).astype("datetime64[ns]")

    stages = summary["stages"]
    fig = plt.figure(figsize=(14, 12), constrained_layout=True)
    grid = fig.add_gridspec(4, max(len(stages), 1), height_ratios=[3, 1.5, 1.5, 1.4])
    ax_price = fig.add_subplot(grid[0, :])
    ax_vpin = fig.add_subplot(grid[1, :], sharex=ax_price)
    ax_pnl = fig.add_subplot(grid[2, :], sharex=ax_price)

    ax_price.plot(t, trace["price"][sel], lw=0.8, color="0.25", label=f"{symbol} trade price")
    if signals is not None:
        s_sel = signals["symbol"] == symbol
        for side, marker, color in (("BUY", "^", "tab:green"), ("SELL", "v", "tab:red"), ("FLAT", "o", "tab:gray")):
            m = s_sel & (signals["side"] == side)
            if m.any():
                ts = signals["ts_ns"][m].astype("datetime64[ns]")
                price = np.interp(signals["ts_ns"][m], trace["ts_ns"][sel], trace["price"][sel])
                ax_price.scatter(ts, price, marker=marker, s=28, color=color, label=f"{side} ({int(m.sum())})", zorder=3)
    ax_price.set_ylabel("price")
    ax_price.legend(loc="best", fontsize=8, framealpha=0.6)
    t0 = summary["ticks"]
    ax_price.set_title(
        f"{summary['pipeline']}: {t0['processed']:,} ticks of {', '.join(summary['symbols'])} "
        f"in {summary['wall_s']:.2f} s ({t0['ticks_per_s']:,.0f} ticks/s); "
        f"rejected {t0['rejected']:,}, quarantined {t0['quarantined']:,}"
    )

    if vpin is not None and (vpin["symbol"] == symbol).any():
        v_sel = vpin["symbol"] == symbol
        vt = vpin["ts_ns"][v_sel].astype("datetime64[ns]")
        ax_vpin.step(vt, vpin["vpin"][v_sel], where="post", color="tab:purple", label="VPIN")
        tox = vpin["toxic"][v_sel].astype(bool)
        if tox.any():
            ax_vpin.scatter(vt[tox], vpin["vpin"][v_sel][tox], color="tab:red", s=14,
                            label="toxic bucket", zorder=3)
        # The flag is the running empirical CDF of VPIN (no hindsight): draw that CDF and
        # its threshold on their own axis rather than a quantile of the whole run.
        ax_cdf = ax_vpin.twinx()
        ax_cdf.step(vt, vpin["cdf"][v_sel], where="post", color="tab:gray", lw=0.7, alpha=0.7,
                    label="running CDF of VPIN")
        threshold = summary.get("vpin_threshold", 0.9)
        ax_cdf.axhline(threshold, ls="--", color="tab:red", lw=0.8, label=f"toxic above CDF {threshold:g}")
        ax_cdf.set_ylim(0, 1.05)
        ax_cdf.set_ylabel("CDF")
        ax_cdf.legend(loc="lower right", fontsize=8)
        ax_vpin.legend(loc="upper left", fontsize=8)
    else:
        ax_vpin.text(0.5, 0.5, "no VPIN buckets completed", transform=ax_vpin.transAxes, ha="center")
    ax_vpin.set_ylabel("VPIN")

    if "pnl" in trace:
        ax_pnl.plot(t, trace["pnl"][sel], color="tab:blue", lw=0.9, label="P&L (quote ccy, after fees)")
        ax_pos = ax_pnl.twinx()
        ax_pos.step(t, trace["position"][sel], where="post", color="tab:orange", lw=0.8, label="position")
        ax_pos.set_ylabel("position")
        ax_pos.legend(loc="upper right", fontsize=8)
        ax_pnl.legend(loc="upper left", fontsize=8)
    ax_pnl.set_ylabel("P&L")
    ax_pnl.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))

    for i, st in enumerate(stages):
        ax = fig.add_subplot(grid[3, i])
        buckets = st.get("batch_latency_buckets") or []
        if buckets:
            lo = np.array([b[0] for b in buckets], dtype=float) / 1e3
            hi = np.array([b[1] + 1 for b in buckets], dtype=float) / 1e3
            counts = np.array([b[2] for b in buckets])
            ax.bar(lo, counts, width=hi - lo, align="edge", color="tab:cyan", edgecolor="none")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            p99 = st["batch_latency"]["p99_us"]
            ax.axvline(p99, color="tab:red", lw=0.8)
        ax.set_title(f"{st['stage']} @ {st['stream']} ({st['batches']:,} batches)\n"
                     f"p50 {st['batch_latency']['p50_us']:,.0f} µs, "
                     f"p99 {st['batch_latency']['p99_us']:,.0f} µs", fontsize=8)
        ax.set_xlabel("µs per batch", fontsize=7)
        ax.tick_params(labelsize=7)

    png = run_dir / "report.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    written = [png]
    if html_page:
        page = run_dir / "report.html"
        img = base64.b64encode(png.read_bytes()).decode()
        rows = "".join(
            f"<tr><td>{html.escape(s['stage'])}</td><td>{html.escape(s['stream'])}</td>"
            f"<td>{s['batch_latency']['p50_us']:,.1f}</td><td>{s['batch_latency']['p99_us']:,.1f}</td>"
            f"<td>{s['rows_per_s']:,.0f}</td></tr>"
            for s in stages
        )
        page.write_text(
            "<!doctype html><meta charset='utf-8'><title>nautilus-pipeline report</title>"
            f"<h1>{html.escape(summary['pipeline'])}</h1><img style='max-width:100%' src='data:image/png;base64,{img}'>"
            "<table border=1 cellpadding=4><tr><th>stage</th><th>stream</th><th>p50 µs</th><th>p99 µs</th>"
            f"<th>rows/s</th></tr>{rows}</table>",
            encoding="utf-8",
        )
        written.append(page)
    return written
