"""The Run object: one way to assemble a run, used by the CLI, the test kit and the examples."""

from __future__ import annotations

import pytest

from nautilus_pipeline import ConfigError
from nautilus_pipeline.app import Run, Summary, TickCounts
from nautilus_pipeline.io.formats import Source

DEFAULT = "pipelines/default.toml"


async def test_a_run_returns_a_typed_summary_whose_accounting_closes():
    run = Run(DEFAULT, outputs=False)
    summary = await run.execute()
    assert isinstance(summary, Summary) and isinstance(summary.ticks, TickCounts)
    t = summary.ticks
    assert t.read == t.delivered + t.rejected + t.quarantined
    assert t.delivered == t.processed + t.failed_in_stages
    assert t.processed == 21_313
    assert summary.as_dict()["ticks"]["processed"] == t.processed


async def test_summary_as_dict_is_what_dataclasses_asdict_gives_less_write_error():
    """``as_dict`` passes plain leaves through instead of deep-copying them: the same
    summary.json, byte for byte, as ``asdict``'s, for a real run's summary (stages, pool,
    latency buckets, accounting) and for containers asdict treats apart."""
    import collections
    import dataclasses

    import orjson

    from nautilus_pipeline.app import _plain

    summary = dataclasses.replace(await Run(DEFAULT, outputs=False).execute(), write_error="disk full")
    want = dataclasses.asdict(summary)
    want.pop("write_error")
    got = summary.as_dict()
    opt = orjson.OPT_SERIALIZE_NUMPY
    assert orjson.dumps(got, option=opt) == orjson.dumps(want, option=opt)
    assert got["stages"] is not summary.stages and got["ticks"]["by_reason"] is not summary.ticks.by_reason
    Pair = collections.namedtuple("Pair", "a b")
    odd = {"pair": Pair(summary.ticks, [1]), "ordered": collections.OrderedDict(z=(1, 2.5, None)),
           "scalar": summary.wall_s}
    assert _plain(odd) == dataclasses.asdict(dataclasses.make_dataclass("W", ["v"])(odd))["v"]


async def test_the_summary_says_how_much_cpu_the_run_took_over_its_wall_time():
    import os
    import time

    cpu0 = time.process_time()
    summary = await Run(DEFAULT, outputs=False).execute()
    spent = time.process_time() - cpu0
    # the run's window is inside this test's: its CPU is positive, at most what the test spent,
    # and at most every core over the run's wall time
    assert 0 < summary.cpu_s <= spent
    assert summary.cpu_s <= summary.wall_s * (os.cpu_count() or 1) + 0.05
    assert summary.as_dict()["cpu_s"] == summary.cpu_s


async def test_the_input_is_read_once_even_with_bucket_volume_auto(monkeypatch):
    opened = []
    original = Source.open

    def counting(self, accounting=None):
        opened.append(self.path)
        return original(self, accounting)

    monkeypatch.setattr(Source, "open", counting)
    run = Run(DEFAULT, outputs=False)  # default.toml has bucket_volume = "auto"
    assert run.replay.kept_rows == 21_313  # the calibration read, kept for the replay
    summary = await run.execute()
    assert len(opened) == 1
    assert summary.ticks.processed == 21_313


async def test_a_run_over_a_budget_reads_again_and_gives_the_same_numbers(monkeypatch):
    from nautilus_pipeline.io import replay as replay_module

    once = await Run(DEFAULT, outputs=False).execute()
    monkeypatch.setattr(replay_module.Replay.scan, "__defaults__", (1024,))
    run = Run(DEFAULT, outputs=False)
    assert run.replay.kept_rows is None
    twice = await run.execute()
    assert (twice.ticks.read, twice.ticks.processed) == (once.ticks.read, once.ticks.processed)
    assert twice.accounting == once.accounting


def test_format_and_symbol_without_ticks_are_refused():
    with pytest.raises(ConfigError, match="ticks"):
        Run(DEFAULT, format="binance_trades", outputs=False)


def test_a_bad_format_for_ticks_is_refused_when_the_run_is_built():
    with pytest.raises(ConfigError, match="format 'nonsense'"):
        Run(DEFAULT, ticks=["nautilus_pipeline/data/binance-um-btcusdt-trades-20240808.csv"],
            format="nonsense", outputs=False)
