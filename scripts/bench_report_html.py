"""Which library writes the report's standalone HTML: plotly or bokeh, by size and speed.

Draws the same figure with both: four panels (price with a bid/ask band, P&L, VPIN,
latency) of ``--points`` points each (what the report keeps after downsampling for
display, whatever the run's tick count), writes one self-contained file with the
library's JavaScript inlined, and prints the file size and the time to build and write it.

    python scripts/bench_report_html.py --points 4000
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=4000)
    args = ap.parse_args()
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
