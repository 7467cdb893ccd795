"""The report as one self-contained HTML page: interactive bokeh charts and the run's tables.

**Why bokeh, not plotly.** Both write a standalone page with their JavaScript inlined.
Measured with ``scripts/bench_report_html.py`` (the same four panels, 2-core dev box,
plotly 7.1.0, bokeh 3.9.2):

=========  ===============  ==========  ===========
points     library          build+write file size
=========  ===============  ==========  ===========
4,000      plotly           0.10 s      5,647 KiB
4,000      bokeh            0.45 s      1,532 KiB
40,000     plotly           0.23 s      14,076 KiB
40,000     bokeh            0.76 s      3,947 KiB
=========  ===============  ==========  ===========

bokeh's page is 3.6x smaller (BokehJS is about 1 MB against plotly.js's 4.6 MB, and bokeh
ships numpy arrays base64-encoded where plotly writes decimal text); plotly builds faster,
but both take under a second, while a 5-14 MB file is what people mail around. A 10M-tick
run does not change these sizes: the series are thinned for display to ``DISPLAY_POINTS``
per panel (``data.downsample``: min/max per stride) and the entry/exit markers to
``data.MAX_MARKERS`` each; the figures in the tables are computed on every row. Measured
with ``scripts/bench_report_html.py --trace-rows N --from-run out/default`` (PNG + HTML,
a synthetic trace with a fill every ~50 rows):

===========  ============  ==========  ===========
trace rows   write_report  report.png  report.html
===========  ============  ==========  ===========
21,313 [1]_  2.6 s         341 KiB     1,393 KiB
1,000,000    3.4 s         405 KiB     1,820 KiB
10,000,000   10.4 s        394 KiB     1,855 KiB
===========  ============  ==========  ===========

.. [1] the default pipeline's real run. ``run`` keeps about 200k trade rows in the trace
   (plus every fill) whatever the input's size, so 10M rows is the worst case.

The charts share the market-time axis (pan or zoom one, all follow); hovering shows the
values. The page has no external request: it opens from a mail attachment or a CI artefact.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .data import RunData, SymbolView, downsample, thin
from .png import _latency_rows, _marker_label, _market_rows, _position_steps, _vpin_rows
from .png import _missing as missing_parts

DISPLAY_POINTS = 6000
_WIDTH = 1150
_STAGE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#bcbd22", "#17becf")


def _dt(ns: np.ndarray) -> np.ndarray:
    return np.asarray(ns, dtype=np.int64).astype("datetime64[ns]").astype("datetime64[ms]")


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<section><h2>{html.escape(title)}</h2><table>{body}</table></section>"


def _figure(title: str, y_label: str, x_range=None, height: int = 260, datetime: bool = True,
            y_log: bool = False):
    from bokeh.models import DatetimeTickFormatter
    from bokeh.plotting import figure

    kw = {"x_range": x_range} if x_range is not None else {}
    fig = figure(title=title, height=height, width=_WIDTH, tools="xpan,xwheel_zoom,box_zoom,reset,save",
                 active_scroll="xwheel_zoom", x_axis_type="datetime" if datetime else "linear",
                 y_axis_type="log" if y_log else "linear", **kw)
    fig.yaxis.axis_label = y_label
    if datetime:
        fig.xaxis.axis_label = "market time (UTC)"
        fig.xaxis.formatter = DatetimeTickFormatter(seconds="%H:%M:%S", minsec="%H:%M:%S",
                                                    minutes="%H:%M", hours="%m-%d %H:%M",
                                                    days="%Y-%m-%d")
    fig.toolbar.logo = None
    return fig


def _legend_above(fig) -> None:
    """Legends in a row above the plot, so that they never cover the series."""
    if fig.legend:
        legend = fig.legend[0]
        legend.orientation = "horizontal"
        legend.click_policy = "hide"
        legend.label_text_font_size = "9pt"
        fig.add_layout(legend, "above")


def _hover(fig, renderers, tips):
    from bokeh.models import HoverTool

    fig.add_tools(HoverTool(renderers=renderers, tooltips=tips, formatters={"@t": "datetime"}))


def _price(v: SymbolView):
    from bokeh.models import ColumnDataSource

    fig = _figure(f"{v.symbol}: price, bid/ask and entries/exits", f"price ({v.ccy})", height=380)
    if v.quote_ts.size:
        i = downsample(v.bid, DISPLAY_POINTS)
        t = _dt(v.quote_ts[i])
        fig.varea_step(x=t, y1=v.bid[i], y2=v.ask[i], step_mode="after", fill_color="#1f77b4",
                       fill_alpha=0.25, legend_label=f"bid/ask ({v.quote_ts.size:,} quotes)")
        fig.step(t, v.bid[i], mode="after", color="#1f77b4", line_width=0.8, legend_label="bid")
        fig.step(t, v.ask[i], mode="after", color="#d62728", line_width=0.8, legend_label="ask")
    if v.trade_ts.size:
        i = downsample(v.price, DISPLAY_POINTS, thin(v.fill_idx))
        src = ColumnDataSource({"t": _dt(v.trade_ts[i]), "price": v.price[i]})
        line = fig.line("t", "price", source=src, color="#333333", line_width=1,
                        legend_label=f"trade price ({v.trade_ts.size:,} trades)")
        _hover(fig, [line], [("time", "@t{%F %T.%3N}"), ("price", "@price{0,0.00}")])
    elif v.quote_ts.size:
        i = downsample(v.bid, DISPLAY_POINTS)
        fig.line(_dt(v.quote_ts[i]), (v.bid[i] + v.ask[i]) / 2, color="#333333", legend_label="mid")
    if v.position is not None:
        pos = v.position
        for idx, marker, color, label in (
            (v.entries[pos[v.entries] > 0], "triangle", "#2ca02c", "long entry"),
            (v.entries[pos[v.entries] < 0], "inverted_triangle", "#d62728", "short entry"),
            (v.exits, "x", "#000000", "exit"),
        ):
            if idx.size:
                shown = thin(idx)
                src = ColumnDataSource({"t": _dt(v.trade_ts[shown]), "price": v.price[shown],
                                        "position": pos[shown], "pnl": v.pnl[shown]})
                r = fig.scatter("t", "price", source=src, marker=marker, size=7, color=color,
                                legend_label=_marker_label(label, idx, shown))
                _hover(fig, [r], [("time", "@t{%F %T.%3N}"), ("price", "@price{0,0.00}"),
                                  ("position after", "@position"), ("net P&L", "@pnl{0,0.00}")])
    _legend_above(fig)
    return fig


def _position(v: SymbolView, x_range):
    fig = _figure("position", "base units", x_range=x_range, height=150)
    keep = _position_steps(v)
    fig.step(_dt(v.trade_ts[keep]), v.position[keep], mode="after", color="#ff7f0e")
    return fig


def _pnl(v: SymbolView, x_range):
    from bokeh.models import ColumnDataSource

    fig = _figure("simulated P&L after fees, and drawdown", f"P&L ({v.ccy})", x_range=x_range)
    i = downsample(v.pnl, DISPLAY_POINTS, thin(v.fill_idx))
    src = ColumnDataSource({"t": _dt(v.trade_ts[i]), "net": v.pnl[i], "gross": v.gross[i],
                            "fees": -(v.gross[i] - v.pnl[i]), "dd": -v.drawdown[i],
                            "zero": np.zeros(i.size)})
    fig.varea("t", "zero", "dd", source=src, fill_color="#d62728", fill_alpha=0.18,
              legend_label="drawdown")
    fig.line("t", "gross", source=src, color="#7f7f7f", legend_label="gross")
    fig.line("t", "fees", source=src, color="#8c564b", line_dash="dashed",
             legend_label="fees (cumulative, −)")
    net = fig.line("t", "net", source=src, color="#1f77b4", line_width=2, legend_label="net")
    _hover(fig, [net], [("time", "@t{%F %T.%3N}"), ("net", "@net{0,0.00}"),
                        ("gross", "@gross{0,0.00}"), ("drawdown", "@dd{0,0.00}")])
    _legend_above(fig)
    return fig


def _vpin(v: SymbolView, threshold: float, x_range):
    from bokeh.models import ColumnDataSource, LinearAxis, Range1d, Span

    fig = _figure("VPIN, toxic buckets and the running CDF that flags them "
                  f"(dashed: toxic above CDF {threshold:g})", "VPIN", x_range=x_range)
    src = ColumnDataSource({"t": _dt(v.vpin_ts), "vpin": v.vpin, "cdf": v.cdf})
    line = fig.step("t", "vpin", source=src, mode="after", color="#9467bd", line_width=1.5,
                    legend_label="VPIN")
    if v.toxic.any():
        fig.scatter(_dt(v.vpin_ts[v.toxic]), v.vpin[v.toxic], color="#d62728", size=6,
                    legend_label=f"toxic ({int(v.toxic.sum())})")
    fig.extra_y_ranges = {"cdf": Range1d(0, 1.05)}
    fig.add_layout(LinearAxis(y_range_name="cdf", axis_label="CDF of VPIN"), "right")
    fig.step("t", "cdf", source=src, mode="after", color="#7f7f7f", y_range_name="cdf",
             legend_label="running CDF")
    fig.add_layout(Span(location=threshold, dimension="width", line_color="#d62728",
                        line_dash="dashed", y_range_name="cdf"))
    _hover(fig, [line], [("time", "@t{%F %T}"), ("VPIN", "@vpin{0.000}"), ("CDF", "@cdf{0.00}")])
    _legend_above(fig)
    return fig


def _latency(run: RunData):
    from bokeh.models import ColumnDataSource

    lat = run.latency
    fig = _figure("per-stage batch latency over the run (solid p50, dashed p99)", "µs per batch",
                  height=300, datetime=False, y_log=True)
    fig.xaxis.axis_label = "run time (s since start)"
    for stage, color in zip(dict.fromkeys(lat["stage"].tolist()), _STAGE_COLORS, strict=False):
        m = lat["stage"] == stage
        src = ColumnDataSource({"s": lat["elapsed_s"][m], "p50": lat["p50_ns"][m] / 1e3,
                                "p90": lat["p90_ns"][m] / 1e3, "p99": lat["p99_ns"][m] / 1e3,
                                "max": lat["max_ns"][m] / 1e3, "n": lat["batches"][m],
                                "pool": lat["pool_in_use"][m]})
        r = fig.line("s", "p50", source=src, color=color, line_width=1.5, legend_label=stage)
        fig.scatter("s", "p50", source=src, color=color, size=4, legend_label=stage)
        fig.line("s", "p99", source=src, color=color, line_dash="dashed", legend_label=stage)
        _hover(fig, [r], [("stage", stage), ("run time", "@s{0.00} s"), ("batches", "@n"),
                          ("p50", "@p50{0,0} µs"), ("p90", "@p90{0,0} µs"),
                          ("p99", "@p99{0,0} µs"), ("max", "@max{0,0} µs"),
                          ("slabs in use", "@pool")])
    _legend_above(fig)
    return fig


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
h1{font-size:1.4em;margin:.2em 0} h2{font-size:1.05em;margin:.8em 0 .3em}
.tables{display:flex;flex-wrap:wrap;gap:2em} table{border-collapse:collapse}
th{text-align:left;font-weight:600;padding:2px 12px 2px 0;color:#555}
td{font-family:ui-monospace,monospace;padding:2px 0}
.empty{color:#b00;font-size:1.2em;margin:1em 0}
.charts{margin-top:1em}
"""


_TEMPLATE = """{% from macros import embed %}<!doctype html><html lang="en"><head>{{ head }}
{{ bokeh_css }}{{ bokeh_js }}</head><body>{{ body }}<div class="charts">{{ embed(roots[0]) }}</div>
{{ plot_script }}</body></html>"""


def _bokeh_page(layout, title: str, head: str, body: str) -> str:
    """The page with only the BokehJS bundles these charts need, inlined (no CDN)."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE
    from jinja2 import Template

    return file_html(layout, INLINE, title, template=Template(_TEMPLATE),
                     template_variables={"head": head, "body": body})


def write_html(run: RunData, path: Path) -> Path:
    from bokeh.layouts import column

    v = run.primary
    title = run.title()
    parts = [f"<h1>{html.escape(title)}</h1>", '<div class="tables">', _table("run", run.header())]
    empty = run.nothing_to_draw()
    charts = []
    if empty is None:
        parts.append(_table("market", _market_rows(run, v)))
        if v.figures is not None:
            for o in [v, *(o for o in run.views if o is not v and o.figures is not None)]:
                parts.append(_table(f"figures ({o.symbol})", o.figures.rows(o.ccy)))
        else:
            parts.append(_table("figures", [("P&L", "no risk stage in this pipeline: no P&L")]))
        parts.append(_table("VPIN", _vpin_rows(run, v)))
        parts.append(_table("latency (whole run)", _latency_rows(run)))
        price = _price(v)
        charts.append(price)
        if v.position is not None:
            charts.append(_position(v, price.x_range))
            charts.append(_pnl(v, price.x_range))
        if v.vpin is not None:
            charts.append(_vpin(v, run.vpin_threshold, price.x_range))
        if run.latency is not None:
            charts.append(_latency(run))
    parts.append("</div>")
    if empty is not None:
        parts.append(f'<p class="empty" id="nothing-to-draw">{html.escape(empty)}</p>')
    if empty is None and missing_parts(run, v):
        parts.append("<p>not drawn: " + "; ".join(html.escape(m) for m in missing_parts(run, v))
                     + "</p>")
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style>"
    if charts:
        page = _bokeh_page(column(*charts), title, head, "".join(parts))
    else:
        page = (f"<!doctype html><html lang='en'><head>{head}</head>"
                f"<body>{''.join(parts)}</body></html>")
    path.write_text(page, encoding="utf-8")
    return path
