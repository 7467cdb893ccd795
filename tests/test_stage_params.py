"""One definition per stage: its Params dataclass is the TOML schema, the defaults and the docs."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from nautilus_pipeline import ConfigError, Stage, config
from nautilus_pipeline.params import param, schema_of
from nautilus_pipeline.stages import STAGE_TYPES

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class SpreadParams:
    max_spread_bp: float = param(5.0, "widest spread that counts as tradable, in bp")

    def __post_init__(self) -> None:
        if not self.max_spread_bp > 0:
            raise ConfigError(f"max_spread_bp must be > 0, got {self.max_spread_bp}")


class SpreadStage(Stage):
    """A user's stage, named in TOML by its import path."""

    Params = SpreadParams
    reads = ("bid", "ask")

    def __init__(self, params: SpreadParams, *, name: str = "spread", streams=("cpu",)):
        self.params, self.name, self.streams = params, name, tuple(streams)

    @classmethod
    def from_params(cls, p, ctx, *, name, streams):
        return cls(p, name=name, streams=streams)

    async def process(self, lease, stream, ctx) -> None:
        pass


USER = """
[[sources]]
path = "package:binance-um-btcusdt-trades-20240808.csv"
[[stages]]
type = "test_stage_params:SpreadStage"
{key} = {value}
"""


def test_a_users_stage_is_named_by_import_path_and_built_from_its_params():
    d = config.loads(USER.format(key="max_spread_bp", value="2.5"), "u.toml")
    (stage,) = config.build_stages(d, [])
    assert isinstance(stage, SpreadStage)
    assert stage.params == SpreadParams(2.5) and stage.name == "spreadstage"


def test_a_users_stage_key_typo_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown key stages\[0\]\.max_spread_b .*did you mean 'max_spread_bp'"):
        config.loads(USER.format(key="max_spread_b", value="2.5"), "u.toml")


def test_a_users_stage_checks_run_at_build_with_file_and_stage():
    d = config.loads(USER.format(key="max_spread_bp", value="-1"), "u.toml")
    with pytest.raises(ConfigError, match=r"u\.toml: stages\[0\] .*max_spread_bp must be > 0"):
        config.build_stages(d, [])


def test_an_import_path_that_is_not_a_stage_is_refused():
    bad = USER.format(key="x", value="1").replace("test_stage_params:SpreadStage", "pathlib:Path")
    with pytest.raises(ConfigError, match="is not a Stage subclass"):
        config.loads(bad, "u.toml")
    missing = USER.format(key="x", value="1").replace("test_stage_params:SpreadStage", "no_such_mod:X")
    with pytest.raises(ConfigError, match="cannot be imported"):
        config.loads(missing, "u.toml")


def test_the_signal_stage_takes_no_keys_but_name_and_streams():
    # the rule is the risk stage's (its signal table); publishing needs no parameters
    assert not hasattr(STAGE_TYPES["signal"], "Params")
    assert set(config.stage_schema(STAGE_TYPES["signal"])) == {"name", "streams"}


@pytest.mark.parametrize("type_name", sorted(set(STAGE_TYPES) - {"signal"}))
def test_every_builtin_stage_has_params_whose_defaults_match_its_constructor(type_name):
    cls = STAGE_TYPES[type_name]
    schema = schema_of(cls.Params)
    assert schema, type_name
    ctor = inspect.signature(cls.__init__).parameters
    for key, spec in schema.items():
        assert spec.doc, f"{type_name}.{key} has no doc"
        if key in ctor and ctor[key].default is not inspect.Parameter.empty:
            default = ctor[key].default
            default = list(default) if isinstance(default, tuple) else default
            assert default == spec.default, f"{type_name}.{key}: {default!r} vs {spec.default!r}"


def test_the_stage_keys_in_pipelines_readme_are_generated_from_the_params():
    done = subprocess.run([sys.executable, "scripts/gen_pipeline_docs.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


async def test_a_stage_stat_cannot_overwrite_the_runners_counters():
    import numpy as np

    from nautilus_pipeline import Pipeline
    from nautilus_pipeline.testing import trades_frame

    class Boastful(Stage):
        name = "boastful"

        async def process(self, lease, stream, ctx) -> None:
            pass

        def stats(self):
            return {"rows": -1, "mine": 7}

    async with Pipeline([Boastful()], batch_size=64) as pipe:
        await pipe.ingest(trades_frame(100))
        await pipe.drain()
        (st,) = pipe.stats()["stages"]
    assert st["rows"] == 100 and st["stage.rows"] == -1 and st["mine"] == 7
    assert np.isfinite(st["rows_per_s"])


def test_topics_are_built_in_one_module_and_refuse_segments_that_change_their_shape():
    from nautilus_pipeline import topics

    assert topics.signals("BTCUSDT-PERP") == "signals.BTCUSDT-PERP"
    assert topics.ticks("trades", "BINANCE", "ETHUSDT") == "ticks.trades.BINANCE.ETHUSDT"
    assert topics.deadletter("pipeline.x.ticks") == "deadletter.pipeline.x.ticks"
    for bad in ("BRK.B", "A B", "*", ">", ""):
        with pytest.raises(ConfigError, match="topic segment"):
            topics.ticks("trades", "XNAS", bad)
