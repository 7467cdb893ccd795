"""The public surface: what the README imports is exported, errors carry their context."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import nautilus_pipeline as nt
from nautilus_pipeline.io import Replay, Source

ROOT = Path(__file__).resolve().parents[1]
TRADES = ROOT / "nautilus_pipeline" / "data" / "binance-um-btcusdt-trades-20240808.csv"


def test_every_nt_name_the_readme_uses_is_exported():
    used = set(re.findall(r"\bnt\.([A-Za-z_]\w*)", (ROOT / "README.md").read_text()))
    assert used, "the README uses nt.*"
    assert used <= set(nt.__all__), sorted(used - set(nt.__all__))
    for name in nt.__all__:
        assert hasattr(nt, name), name


def test_a_bad_row_under_fail_raises_a_data_error_with_file_line_and_reason(tmp_path):
    lines = TRADES.read_text().splitlines(keepends=True)
    fields = lines[5].split(",")
    fields[1] = "-1"  # the price of the fifth data row
    lines[5] = ",".join(fields)
    bad = tmp_path / "bad.csv"
    bad.write_text("".join(lines))
    replay = Replay([Source(bad, format="binance_trades", symbol="X", policy="fail")])
    with pytest.raises(nt.DataError) as info:
        for _ in replay.iter_arrays():
            pass
    err = info.value
    assert err.file == str(bad) and err.line == 6 and err.reason
    assert f"{bad}, line/record 6" in str(err)
