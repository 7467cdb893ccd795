"""The report: what it shows for real runs of each bundled pipeline, and runs with nothing to draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from report_helpers import all_quarantined_run as all_quarantined_run_in

from nautilus_pipeline.cli import main
from nautilus_pipeline.report import load_run, write_report
from nautilus_pipeline.report.data import downsample, quote_currency

pytest.importorskip("matplotlib", reason="the report needs matplotlib (the 'report' extra)")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    import structlog

    structlog.reset_defaults()


def _run(tmp_path_factory, pipeline: str, *extra: str) -> Path:
    out = tmp_path_factory.mktemp(pipeline)
    assert main(["run", str(REPO / "pipelines" / f"{pipeline}.toml"), "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return _run(tmp_path_factory, "default")


@pytest.fixture(scope="module")
def vpin_run(tmp_path_factory):
    return _run(tmp_path_factory, "vpin")


@pytest.fixture(scope="module")
def quotes_run(tmp_path_factory):
    return _run(tmp_path_factory, "quotes")


@pytest.fixture(scope="module")
def all_quarantined_run(tmp_path_factory):
    """Every row has a negative price: all quarantined, nothing reaches the stages."""
    return all_quarantined_run_in(tmp_path_factory.mktemp("allbad"), 39)


def _ink(png: np.ndarray, ax) -> float:
    """Share of the pixels inside an axes' box that are not the white background."""
    fig_h = png.shape[0]
    box = ax.get_window_extent()
    x0, x1 = int(box.x0) + 2, int(box.x1) - 2
    y0, y1 = fig_h - int(box.y1) + 2, fig_h - int(box.y0) - 2
    crop = png[y0:y1, x0:x1, :3]
    return float((crop.min(axis=2) < 0.9).mean())


def _panels(run_dir: Path, tmp_path: Path) -> tuple[dict, dict[str, float]]:
    """Draw the report's figure, save it, and measure the ink in every panel of the PNG."""
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from nautilus_pipeline.report.png import build_figure

    fig, axes = build_figure(load_run(run_dir))
    path = tmp_path / "report.png"
    fig.savefig(path, dpi=100)
    png = mpimg.imread(path)
    ink = {name: _ink(png, ax) for name, ax in axes.items()}
    plt.close(fig)
    return axes, ink


def test_default_report_has_every_panel_with_content(default_run, tmp_path):
    axes, ink = _panels(default_run, tmp_path)
    assert list(axes) == ["price", "position", "pnl", "vpin", "latency"]
    for name, share in ink.items():
        assert share > 0.01, f"panel {name} is blank ({share:.2%} ink)"
    assert axes["price"].get_ylabel() == "price (USDT)"
    assert axes["pnl"].get_ylabel() == "P&L (USDT)"
    assert axes["latency"].get_yscale() == "log"
    labels = [t.get_text() for t in axes["price"].get_legend().get_texts()]
    assert any(t.startswith("long entry") for t in labels) and any(t.startswith("exit") for t in labels)
    assert not any("FLAT" in t for t in labels)


def test_figures_follow_from_the_trace_and_the_fee_rate(default_run):
    run = load_run(default_run)
    v = run.primary
    f = v.figures
    trace = pq.read_table(default_run / "trace.parquet").to_pydict()
    pos = np.asarray(trace["position"])[np.asarray(trace["kind"]) == 0]
    price = np.asarray(trace["price"])[np.asarray(trace["kind"]) == 0]
    q = np.diff(np.concatenate(([0.0], pos)))
    assert f.fills == int((q != 0).sum()) > 0
    assert f.fees == pytest.approx(0.0004 * float(np.sum(np.abs(q) * price)))
    assert f.turnover == pytest.approx(float(np.sum(np.abs(q) * price)))
    assert f.gross_pnl == pytest.approx(f.net_pnl + f.fees)
    assert f.net_pnl == pytest.approx(trace["pnl"][-1])
    assert f.max_drawdown == pytest.approx(max(trace["drawdown"]))
    assert 0 < f.round_trips <= f.fills and 0 <= f.hit_rate <= 1 and 0 < f.exposure < 1


def test_quotes_run_draws_the_bid_ask_band_and_no_pnl(quotes_run, tmp_path):
    run = load_run(quotes_run)
    v = run.primary
    assert v.quote_ts.size > 1000 and np.all(v.ask >= v.bid)
    axes, ink = _panels(quotes_run, tmp_path)
    assert list(axes) == ["price", "vpin", "latency"]
    labels = [t.get_text() for t in axes["price"].get_legend().get_texts()]
    assert any(t.startswith("bid (") for t in labels) and "ask" in labels
    assert all(share > 0.01 for share in ink.values()), ink


def test_vpin_only_run_has_price_and_vpin_and_says_what_is_not_drawn(vpin_run, tmp_path):
    axes, ink = _panels(vpin_run, tmp_path)
    assert list(axes) == ["price", "vpin", "latency"]
    assert ink["vpin"] > 0.01
    write_report(vpin_run, html_page=True)
    page = (vpin_run / "report.html").read_text()
    assert "not drawn: " in page and "no risk stage in this pipeline" in page


def test_run_without_trades_warns_and_its_report_says_so(sample_dir, tmp_path, capsys):
    """The default pipeline on FX quotes: no trade, so no fill, no signal and no VPIN bucket."""
    quotes = sample_dir / "truefx-usdjpy-quotes.csv"
    assert main(["run", str(REPO / "pipelines" / "default.toml"), "--ticks", str(quotes),
                 "--out", str(tmp_path), "--log-format", "json"]) == 0
    warnings = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()
                if line.startswith("{")]
    assert [w["event"] for w in warnings if w["level"] == "warning"] == ["run_produced_nothing"]
    assert main(["report", str(tmp_path), "--html"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "trades (none in the input: quotes only)" in page
    assert "no trade to fill on" in page


def test_run_with_nothing_to_draw_gets_a_report_that_says_so(all_quarantined_run, tmp_path, capsys):
    assert main(["report", str(all_quarantined_run), "--html"]) == 0
    assert capsys.readouterr().err == ""
    page = (all_quarantined_run / "report.html").read_text()
    assert 'id="nothing-to-draw"' in page and "quarantined 39" in page
    axes, _ = _panels(all_quarantined_run, tmp_path)
    assert list(axes) == ["message"]
    assert "nothing to draw" in axes["message"].texts[0].get_text()


def test_report_of_a_folder_that_is_no_run_is_one_line_exit_4(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no summary.json" in err[0]


def test_downsample_keeps_extremes_and_fills_for_display_only():
    x = np.sin(np.linspace(0, 50, 1_000_000))
    x[123_457] = 5.0
    idx = downsample(x, 3000, np.array([999, 500_001]))
    assert idx.size < 3200
    assert {123_457, 999, 500_001, 0, x.size - 1} <= set(idx.tolist())


@pytest.mark.parametrize(("symbol", "ccy"), [("BTCUSDT-PERP", "USDT"), ("USDJPY", "JPY"),
                                             ("XBTUSD", "USD"), ("ESU4", None)])
def test_quote_currency_from_the_symbol_name(symbol, ccy):
    assert quote_currency(symbol) == ccy


def test_sparse_trace_keeps_every_fill_so_the_figures_do_not_change(default_run, tmp_path_factory):
    sparse = _run(tmp_path_factory, "default", "--trace-every", "50")
    full, thin = load_run(default_run).primary.figures, load_run(sparse).primary.figures
    rows = pq.read_metadata(sparse / "trace.parquet").num_rows
    assert rows < 21313 / 50 + full.fills + 2
    assert (thin.fills, thin.round_trips) == (full.fills, full.round_trips)
    assert thin.fees == pytest.approx(full.fees) and thin.turnover == pytest.approx(full.turnover)
    assert thin.net_pnl == pytest.approx(full.net_pnl) and thin.max_drawdown <= full.max_drawdown


def test_two_symbol_run_draws_the_busiest_and_gives_everyones_figures(sample_dir, tmp_path):
    files = [sample_dir / "binance-um-btcusdt-trades-20240808.csv",
             sample_dir / "binance-spot-ethusdt-trades-20240808.csv"]
    assert main(["run", str(REPO / "pipelines" / "default.toml"), "--ticks", *map(str, files),
                 "--format", "binance_trades", "--out", str(tmp_path)]) == 0
    run = load_run(tmp_path)
    assert [v.symbol for v in run.views] == ["BTCUSDT", "ETHUSDT"] and run.primary.symbol == "BTCUSDT"
    assert all(v.figures is not None and v.figures.fills > 0 for v in run.views)
    write_report(tmp_path, html_page=True)
    page = (tmp_path / "report.html").read_text()
    assert "figures (BTCUSDT)" in page and "figures (ETHUSDT)" in page
