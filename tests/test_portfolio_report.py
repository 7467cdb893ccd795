"""The report's portfolio panel reads the run's portfolio events and draws weights and factor 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nautilus_pipeline.cli import main
from nautilus_pipeline.report_portfolio import read_portfolio, write_portfolio_report

PORTFOLIO_TOML = Path(__file__).resolve().parents[1] / "pipelines" / "portfolio.toml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("portfolio-run")
    assert main(["run", str(PORTFOLIO_TOML), "--out", str(out), "--no-progress"]) == 0
    return out


def test_panel_data_are_the_events_weights_and_first_factor(run_dir):
    data = read_portfolio(run_dir)
    assert data["symbols"] == ["BTCUSDT-PERP", "ETHUSDT"]
    assert data["weights"].shape == (285, 2)
    assert np.allclose(data["weights"].sum(axis=1), 1.0, rtol=1e-12)
    assert np.all((data["first_factor"] >= 0.5) & (data["first_factor"] <= 1.0))
    assert np.all(np.diff(data["ts_ns"]) > 0)


def test_panel_png_is_written_and_absent_without_a_portfolio_stage(run_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="the report needs matplotlib")
    (path,) = write_portfolio_report(run_dir)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert write_portfolio_report(tmp_path) == []
