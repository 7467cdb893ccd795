"""The report's portfolio panel: min-variance weights and the first factor's share of variance.

Reads ``portfolio.parquet`` (or ``portfolio.jsonl``) that the portfolio stage's events
became, and draws two axes over time: each symbol's minimum-variance weight (NaN where the
covariance was singular: gaps in the lines) and the explained-variance ratio of the first
factor (how much of the book's variance one common move explains).

Kept apart from ``report.py`` so that the main report can be reworked independently; its
one-line hook is ``written += write_portfolio_report(run_dir)`` in
:func:`nautilus_pipeline.report.write_report` (nothing is written when the run had no
portfolio stage). :func:`draw_portfolio_panel` draws onto axes a caller already has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .errors import DataError


def read_portfolio(run_dir: Path) -> dict[str, Any] | None:
    """The portfolio events of a run as arrays: ``ts_ns`` [m], ``symbols``, ``weights`` [m, n],
    ``first_factor`` [m] (explained-variance ratio of factor 1); None if the run has none."""
    run_dir = Path(run_dir)
    pq_path, jl_path = run_dir / "portfolio.parquet", run_dir / "portfolio.jsonl"
    if pq_path.exists():
        import pyarrow.parquet as pq

        rows = pq.read_table(pq_path).to_pylist()
    elif jl_path.exists():
        rows = [orjson.loads(line) for line in jl_path.read_bytes().splitlines() if line]
    else:
        return None
    if not rows:
        return None
    symbols = list(rows[0]["symbols"])
    if any(list(r["symbols"]) != symbols for r in rows):
        raise DataError(f"{run_dir}: portfolio events of different symbol sets in one run")

    def num(x: Any) -> float:
        return np.nan if x is None else float(x)

    return {
        "ts_ns": np.array([r["ts_ns"] for r in rows], dtype=np.int64),
        "symbols": symbols,
        "weights": np.array([[num(x) for x in r["weights_min_var"]] for r in rows]),
        "first_factor": np.array([num(r["explained_variance"][0]) for r in rows]),
    }


def draw_portfolio_panel(ax_weights: Any, ax_factor: Any, data: dict[str, Any]) -> None:
    """Weights per symbol on ``ax_weights``, the first factor's share on ``ax_factor``."""
    t = data["ts_ns"].astype("datetime64[ns]")
    for j, name in enumerate(data["symbols"]):
        ax_weights.plot(t, data["weights"][:, j], lw=1.0, label=name)
    ax_weights.axhline(0.0, color="0.6", lw=0.6)
    ax_weights.set_ylabel("min-variance weight")
    ax_weights.legend(loc="upper left", fontsize=8, ncol=min(len(data["symbols"]), 6))
    ax_weights.set_title("portfolio: minimum-variance weights", loc="left", fontsize=10)
    ax_factor.plot(t, data["first_factor"], lw=1.0, color="tab:purple")
    ax_factor.set_ylim(0.0, 1.0)
    ax_factor.set_ylabel("factor 1 share")
    ax_factor.set_title("first factor's explained variance (λ₁ / Σλ)", loc="left", fontsize=10)


def write_portfolio_report(run_dir: Path) -> list[Path]:
    """Draw ``run_dir/report_portfolio.png``; return ``[path]``, or ``[]`` without events."""
    data = read_portfolio(Path(run_dir))
    if data is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_w, ax_f) = plt.subplots(2, 1, figsize=(14, 6), sharex=True, constrained_layout=True)
    draw_portfolio_panel(ax_w, ax_f, data)
    path = Path(run_dir) / "report_portfolio.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
