"""Which library writes the report's standalone HTML: plotly or bokeh, by size and speed.

Draws the same figure with both: four panels (price with a bid/ask band, P&L, VPIN,
latency) of ``--points`` points each (what the report keeps after downsampling for
display, whatever the run's tick count), writes one self-contained file with the
library's JavaScript inlined, and prints the file size and the time to build and write it.

    pip install plotly   # only for this comparison; the report itself needs bokeh alone
    python scripts/bench_report_html.py --points 4000

``--trace-rows N --from-run DIR`` also times ``write_report`` (PNG + HTML) on a run folder
whose ``trace.parquet`` has N trade rows: DIR's ``summary.json`` and latency windows with a
synthetic random-walk trace (positions changing every ~50 rows), because a real 10M-tick
run takes longer than this 2-core box should spend on it. It shows that the report's cost
and size are bounded by the display thinning, not by the tick count.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _data(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.datetime64("2024-08-08T00:00:00") + np.arange(n) * np.timedelta64(100, "ms")
    price = 60_000 + np.cumsum(rng.normal(0, 5, n))
    return {"t": t, "price": price, "bid": price - 0.5, "ask": price + 0.5,
            "pnl": np.cumsum(rng.normal(0, 1, n)), "vpin": rng.uniform(0, 1, n),
            "lat": rng.lognormal(8, 1, n)}


def plotly_page(d: dict[str, np.ndarray], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=4, cols=1, shared_xaxes=True)
    fig.add_trace(go.Scattergl(x=d["t"], y=d["bid"], mode="lines"), 1, 1)
    fig.add_trace(go.Scattergl(x=d["t"], y=d["ask"], mode="lines", fill="tonexty"), 1, 1)
    fig.add_trace(go.Scattergl(x=d["t"], y=d["price"], mode="lines"), 1, 1)
    fig.add_trace(go.Scattergl(x=d["t"], y=d["pnl"], mode="lines"), 2, 1)
    fig.add_trace(go.Scattergl(x=d["t"], y=d["vpin"], mode="lines"), 3, 1)
    fig.add_trace(go.Scattergl(x=d["t"], y=d["lat"], mode="lines"), 4, 1)
    path.write_text(fig.to_html(include_plotlyjs=True, full_html=True), encoding="utf-8")


def bokeh_page(d: dict[str, np.ndarray], path: Path) -> None:
    from bokeh.embed import file_html
    from bokeh.layouts import column
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    p1 = figure(x_axis_type="datetime", height=300, width=1000)
    p1.varea(x=d["t"], y1=d["bid"], y2=d["ask"])
    p1.line(d["t"], d["price"])
    rest = []
    for key in ("pnl", "vpin", "lat"):
        p = figure(x_axis_type="datetime", height=200, width=1000, x_range=p1.x_range)
        p.line(d["t"], d[key])
        rest.append(p)
    path.write_text(file_html(column(p1, *rest), INLINE, "bench"), encoding="utf-8")


def bench_report(rows: int, from_run: Path) -> None:
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from nautilus_pipeline.report import write_report

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        for name in ("summary.json", "latency.parquet", "vpin.parquet"):
            if (from_run / name).exists():
                shutil.copy(from_run / name, run / name)
        ts = 1_723_161_256_000_000_000 + np.cumsum(rng.integers(1, 20_000_000, rows))
        price = 61_800 + np.cumsum(rng.normal(0, 0.5, rows))
        change = rng.random(rows) < 0.02
        position = np.where(change, rng.choice([-0.01, 0.0, 0.01], rows), np.nan)
        position[0] = 0.0
        idx = np.where(~np.isnan(position), np.arange(rows), 0)
        position = position[np.maximum.accumulate(idx)]
        pnl = np.cumsum(np.concatenate(([0.0], position[:-1] * np.diff(price))))
        dd = np.maximum.accumulate(pnl) - pnl
        pq.write_table(pa.table({"ts_ns": ts, "kind": np.zeros(rows, np.uint8), "price": price,
                                 "position": position, "pnl": pnl, "drawdown": dd,
                                 "symbol": np.full(rows, "BTCUSDT-PERP", dtype=object)}), run / "trace.parquet")
        t0 = time.perf_counter()
        paths = write_report(run, html_page=True)
        dt = time.perf_counter() - t0
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 1024:,.0f} KiB" for p in paths)
        print(f"write_report on {rows:,} trace rows: {dt:.2f} s (PNG + HTML); {sizes}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=4000)
    ap.add_argument("--trace-rows", type=int, default=0)
    ap.add_argument("--from-run", type=Path)
    args = ap.parse_args()
    if args.trace_rows:
        bench_report(args.trace_rows, args.from_run)
        return
    import platform

    import bokeh
    import plotly

    d = _data(args.points)
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"plotly {plotly.__version__}, bokeh {bokeh.__version__}; {args.points:,} points per panel")
    print(f"{'library':<8} {'first s':>8} {'again s':>8} {'file KiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("plotly", plotly_page), ("bokeh", bokeh_page)):
            path = Path(tmp) / f"{name}.html"
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                fn(d, path)
                times.append(time.perf_counter() - t0)
            print(f"{name:<8} {times[0]:>8.2f} {times[1]:>8.2f} {path.stat().st_size / 1024:>9,.0f}")


if __name__ == "__main__":
    main()
