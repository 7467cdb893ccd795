"""A run with nothing to draw, shared by the PNG and the browser tests of the report."""

from __future__ import annotations

from pathlib import Path

from nautilus_pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]


def all_quarantined_run(folder: Path, rows: int) -> Path:
    """Run a definition whose ``rows`` trades all have a negative price (every row
    quarantined, nothing reaches the stages); return the run's output folder."""
    src = REPO / "nautilus_pipeline" / "data" / "binance-um-btcusdt-trades-20240808.csv"
    lines = src.read_text().splitlines()[: rows + 1]
    bad = [lines[0]] + [",".join([f[0], "-5", *f[2:]]) for f in (ln.split(",") for ln in lines[1:])]
    (folder / "bad.csv").write_text("\n".join(bad) + "\n")
    (folder / "p.toml").write_text(
        '[pipeline]\nname = "allbad"\n[[sources]]\npath = "bad.csv"\nformat = "binance_trades"\n'
        'symbol = "BTCUSDT"\non_bad_row = "quarantine"\n[[stages]]\ntype = "vpin"\n'
        'bucket_volume = 10.0\n[outputs]\ndir = "out"\n')
    assert main(["run", str(folder / "p.toml"), "--out", str(folder / "out")]) == 0
    return folder / "out"
