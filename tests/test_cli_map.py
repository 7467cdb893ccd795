"""Generic CSV from the command line: ``--map`` on inspect and run, the definition's mapping kept
under ``--ticks``, and the format names in ``--help``."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from nautilus_pipeline import config
from nautilus_pipeline.cli import FORMAT_NAMES, _parser, main
from nautilus_pipeline.errors import ConfigError
from nautilus_pipeline.io import READERS
from nautilus_pipeline.io.table import mapping_from_text

UM = "binance-um-btcusdt-trades-20240808.csv"
MAP = "ts=time:ms,price=px,size=qty,side=side:buy/sell"


@pytest.fixture
def generic_csv(sample_dir: Path, tmp_path: Path) -> Path:
    """The bundled Binance trades rewritten with other column names and buy/sell words."""
    lines = (sample_dir / UM).read_text().splitlines()[1:]
    out = ["time,px,qty,side"]
    for ln in lines:
        _, price, qty, _, ts, maker = ln.split(",")
        out.append(f"{ts},{price},{qty},{'sell' if maker == 'true' else 'buy'}")
    p = tmp_path / "my-trades.csv"
    p.write_text("\n".join(out) + "\n")
    return p


def test_the_map_text_becomes_a_field_map() -> None:
    assert mapping_from_text(MAP) == {"ts": "time", "ts_unit": "ms", "price": "px", "size": "qty",
                                      "side": "side", "side_encoding": "buy_sell"}
    assert mapping_from_text("ts=t,bid=b,ask=a,kind=quote")["kind"] == "quote"
    with pytest.raises(ConfigError, match="unknown column-mapping keys \\['prise'\\]"):
        mapping_from_text("ts=t,prise=p")
    with pytest.raises(ConfigError, match="is not field=column"):
        mapping_from_text("ts")


def test_inspect_with_a_map_reads_a_generic_csv_like_the_binance_file(sample_dir, generic_csv, capsys) -> None:
    assert main(["inspect", str(generic_csv), "--map", MAP, "--json"]) == 0
    assert main(["inspect", str(sample_dir / UM), "--json"]) == 0
    out = capsys.readouterr().out.strip().split("\n]\n")
    mine, theirs = orjson.loads(out[0] + "\n]"), orjson.loads(out[1])
    for k in ("ticks", "trades", "trade_sides", "first_ts", "last_ts", "bad_rows"):
        assert mine[0][k] == theirs[0][k], k


def test_run_with_ticks_and_a_map(generic_csv, tmp_path, capsys) -> None:
    assert main(["run", "vpin", "--ticks", str(generic_csv), "--map", MAP, "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    summary = orjson.loads((tmp_path / "o" / "summary.json").read_bytes())
    assert summary["ticks"]["read"] == summary["ticks"]["delivered"] == 21_313


def test_without_a_map_ticks_keep_the_definitions_mapping(generic_csv, tmp_path) -> None:
    d = tmp_path / "mine.toml"
    d.write_text(f"""
[[sources]]
path = "{generic_csv}"
format = "csv"
options = {{ mapping = {{ ts = "time", ts_unit = "ms", price = "px", size = "qty", side = "side", side_encoding = "buy_sell" }} }}
[[stages]]
type = "vpin"
bucket_volume = 5.0
""")
    definition = config.load(d)
    (src,) = config.make_sources(definition, [str(generic_csv)], tmp_path)
    assert src.options["mapping"]["price"] == "px"
    (src,) = config.make_sources(definition, [str(generic_csv)], tmp_path, mapping=mapping_from_text("ts=time,price=px,size=qty"))
    assert "side" not in src.options["mapping"]


def test_map_without_ticks_is_a_usage_error(capsys) -> None:
    assert main(["run", "vpin", "--map", MAP]) == 2
    assert "--map applies to --ticks files" in capsys.readouterr().err


def test_help_lists_every_format_name(capsys) -> None:
    assert set(FORMAT_NAMES) == set(READERS)
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in FORMAT_NAMES) and "ts=time:ms" in text
