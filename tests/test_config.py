"""Pipeline definitions: every bundled one validates; mistakes name the file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from nautilus_pipeline import config
from nautilus_pipeline.errors import ConfigError

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))

MINIMAL = """
[[sources]]
path = "package:binance-um-btcusdt-trades-20240808.csv"
[[stages]]
type = "vpin"
bucket_volume = 5.0
"""


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_bundled_definition_builds(path):
    definition = config.load(path)
    sources = config.make_sources(definition, None, None)
    stages = config.build_stages(definition, sources)
    pipe = config.build_pipeline(definition, stages)
    assert [s.name for s in pipe.stages] == [sd.type for sd in definition.stages]


def test_bundled_pipelines_include_the_four_the_docs_promise():
    assert {p.stem for p in PIPELINES} >= {"default", "vpin", "quotes", "gpu"}


def test_a_typo_in_a_key_is_an_error_with_a_suggestion():
    text = MINIMAL.replace("bucket_volume = 5.0", "bucket_volume = 5.0\nwindwo = 10")
    with pytest.raises(ConfigError, match=r"my\.toml: unknown key stages\[0\]\.windwo \(did you mean 'window'\?\)"):
        config.loads(text, "my.toml")


def test_unknown_top_level_and_pipeline_keys_are_errors():
    with pytest.raises(ConfigError, match=r"unknown key \(top level\)\.stage "):
        config.loads(MINIMAL + "\n[stage]\n", "x.toml")
    with pytest.raises(ConfigError, match=r"unknown key pipeline\.batchsize \(did you mean 'batch_size'\?\)"):
        config.loads("[pipeline]\nbatchsize = 10\n" + MINIMAL, "x.toml")


def test_wrong_types_and_choices_say_what_is_allowed():
    with pytest.raises(ConfigError, match=r"pipeline\.batch_size must be an integer, got 'big'"):
        config.loads('[pipeline]\nbatch_size = "big"\n' + MINIMAL, "x.toml")
    with pytest.raises(ConfigError, match=r"sources\[0\]\.on_bad_row = 'ignore' is not allowed; choose one of 'fail', 'reject', 'quarantine'"):
        config.loads(MINIMAL.replace('[[stages]]', 'on_bad_row = "ignore"\n[[stages]]'), "x.toml")


def test_unknown_stage_type_and_missing_required_key():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.type = 'vpn' is unknown \(did you mean 'vpin'\?\)"):
        config.loads(MINIMAL.replace('type = "vpin"', 'type = "vpn"'), "x.toml")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.bucket_volume is required"):
        config.loads(MINIMAL.replace("bucket_volume = 5.0", ""), "x.toml")


def test_invalid_values_are_reported_with_the_stage():
    definition = config.loads(MINIMAL.replace("bucket_volume = 5.0", "bucket_volume = -1.0"), "x.toml")
    with pytest.raises(ConfigError, match=r"x\.toml: stages\[0\] \(vpin\): VPIN: bucket_volume must be a positive volume"):
        config.build_stages(definition, [])


def test_not_toml_and_missing_file():
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.loads("[[stages]\n", "broken.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load("no/such/pipeline.toml")


def test_auto_bucket_volume_is_the_sources_volume_over_the_bucket_count():
    definition = config.loads(MINIMAL.replace("bucket_volume = 5.0", 'bucket_volume = "auto"\nbuckets_per_source = 40'), "x.toml")
    sources = config.make_sources(definition, None, None)
    (stage,) = config.build_stages(definition, sources)
    import numpy as np

    from nautilus_pipeline.io import Replay

    total = sum(float(b["size"].sum()) for b in Replay(sources).iter_arrays())
    (volume,) = stage.bucket_volume.values()
    assert volume == pytest.approx(total / 40, rel=1e-12)
    assert np.isfinite(volume)


def test_symbols_outside_the_allow_list_are_bad_rows_under_the_source_policy(tmp_path):
    from nautilus_pipeline.io import Replay

    text = MINIMAL.replace("[[sources]]", '[pipeline]\nsymbols = ["ETHUSDT"]\n\n[[sources]]').replace(
        'path = "package:binance-um-btcusdt-trades-20240808.csv"',
        'path = "package:binance-um-btcusdt-trades-20240808.csv"\nsymbol = "BTCUSDT-PERP"\n'
        'on_bad_row = "quarantine"',
    )
    definition = config.loads(text, "x.toml")
    sources = config.make_sources(definition, None, tmp_path)
    replay = Replay(sources)
    assert sum(len(b["ts_ns"]) for b in replay.iter_arrays()) == 0
    total = replay.accounting.total
    assert total.read == total.quarantined == 21313
    assert total.by_reason == {"unknown_symbol": 21313}
    line = (tmp_path / "quarantine-0-binance-um-btcusdt-trades-20240808.jsonl").read_text().splitlines()[0]
    assert "BTCUSDT-PERP" in line and "symbols list" in line
