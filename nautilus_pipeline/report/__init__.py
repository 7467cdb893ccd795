"""``nautilus-pipeline report DIR [--html]``: a run's picture for a trader and an operator.

``report.png`` (matplotlib) and, with ``--html``, one self-contained ``report.html`` with
interactive charts (bokeh) and the same tables. What is drawn and how the figures are
computed: ``data.py``; the PNG: ``png.py``; the page: ``html.py``; the per-stage latency
windows that ``run`` records for it: ``timeline.py``.

A run with nothing to draw (no trades, no quotes, no VPIN bucket) gets a report that says
so, with the run's header; only a folder that is not a run's output is an error.
"""

from __future__ import annotations

from pathlib import Path

from .data import RunData, load_run

__all__ = ["RunData", "load_run", "write_report"]


def write_report(run_dir: str | Path, *, html_page: bool = False) -> list[Path]:
    """Draw ``run_dir/report.png`` (and ``report.html``, and ``report_portfolio.png`` for a
    run with a portfolio stage); return the paths written."""
    from .png import write_png

    run = load_run(run_dir)
    written = [write_png(run, run.dir / "report.png")]
    if html_page:
        from .html import write_html

        written.append(write_html(run, run.dir / "report.html"))
    from ..report_portfolio import write_portfolio_report

    written += write_portfolio_report(run.dir)  # nothing for a run without a portfolio stage
    return written
