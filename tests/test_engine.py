"""The execution engine: concurrent stages give the serial numbers, bit for bit; the Monte
Carlo sampler against a plain reference; live ingress; start-up that unwinds; no torch on a
CPU-only host."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest
from reference_analytics import generated_trades
from test_integration import COLUMNS, Capture, btc_trades, chain

from nautilus_pipeline.bus import EventBus
from nautilus_pipeline.errors import BusClosedError
from nautilus_pipeline.events import TradeTick
from nautilus_pipeline.kernels.montecarlo import LANES, McSampler, splitmix_seed
from nautilus_pipeline.kernels.risk import mc_var, new_generator
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stage import LIGHT_OFFLOAD_MIN_ROWS, OFFLOAD_MIN_ROWS, Stage
from nautilus_pipeline.stages.recorder import RecorderStage

ROOT = Path(__file__).resolve().parents[1]


SPLIT_SEEN: dict[str, int] = {}  # inference batches on two lanes in the last run_chain, by execution
OFFLOADED_BY_STAGE: dict[str, dict[str, int]] = {}  # calls on a worker in the last run_chain, by stage


async def run_chain(data, batch_size, execution, offload_all=False, cores=16):
    """``cores=16``: a host with a core for every worker thread, so that the workers' paths
    are under test on any machine (``Pipeline(cores=0)`` would follow this one's)."""
    stages = chain()
    if offload_all:  # every stage's batches on its worker (the light ones stay inline by default)
        for stage in stages:
            stage.offload = OFFLOAD_MIN_ROWS
    capture = Capture(("ts_ns", *COLUMNS))
    pipe = Pipeline([*stages, capture], batch_size=batch_size, slabs=4, memory="host",
                    execution=execution, cores=cores)
    events: dict[str, list] = {"signals": [], "vpin": [], "risk": []}
    async with pipe:
        for name, got in events.items():
            pipe.bus.subscribe(f"{name}.>", lambda e, got=got: got.append(e.payload))
        pipe.symbols.id_of("BTCUSDT-PERP")
        for part in data if isinstance(data, list) else [data]:  # a list: one ingest each
            await pipe.ingest(part)
    offloaded = sum(r.stats()["offloaded_calls"] for r in pipe.runners)
    OFFLOADED_BY_STAGE[execution] = {r.stage.name: r.stats()["offloaded_calls"] for r in pipe.runners}
    SPLIT_SEEN[execution] = sum(getattr(r.stage, "split_batches", 0) for r in pipe.runners)
    return capture.result(), {k: orjson.dumps(v) for k, v in events.items()}, offloaded


@pytest.mark.parametrize("batch_size", [1, 7, 4096])
async def test_concurrent_stages_give_the_serial_numbers_bit_for_bit_on_real_trades(
    sample_dir, batch_size
):
    data = btc_trades(sample_dir, 3000 if batch_size < 4096 else None)
    serial, serial_events, none = await run_chain(data, batch_size, "serial")
    concurrent, events, offloaded = await run_chain(data, batch_size, "concurrent")
    assert none == 0
    # batches of at least OFFLOAD_MIN_ROWS rows ran on worker threads, smaller ones inline
    assert (offloaded > 0) == (batch_size >= OFFLOAD_MIN_ROWS)
    assert b"var" in events["risk"] and len(events["signals"]) > 10
    for key, col in serial.items():
        np.testing.assert_array_equal(concurrent[key], col, err_msg=key)
    assert events == serial_events


async def test_light_stages_run_a_replay_batch_inline_and_the_heavy_ones_on_their_workers(sample_dir, tmp_path):
    """At 4,096 rows features, VPIN and the recorder cost about a hop, so they stay on the
    loop (``LIGHT_OFFLOAD_MIN_ROWS``); inference and risk go to their workers."""
    stages = [*chain(), RecorderStage(tmp_path / "trace.parquet")]
    pipe = Pipeline(stages, batch_size=4096, slabs=4, memory="host", execution="concurrent", cores=16)
    async with pipe:
        pipe.symbols.id_of("BTCUSDT-PERP")
        await pipe.ingest(btc_trades(sample_dir, None))
    by_stage = {r.stage.name: r.stats()["offloaded_calls"] for r in pipe.runners}
    recorder = next(r for r in pipe.runners if r.stage.name == "recorder")
    assert by_stage["features"] == by_stage["vpin"] == by_stage["recorder"] == 0
    assert recorder.stream.inline > 0  # it called its stream, on the loop
    assert by_stage["inference"] > 0 and by_stage["risk"] > 0
    assert LIGHT_OFFLOAD_MIN_ROWS > 4096 >= OFFLOAD_MIN_ROWS


@pytest.mark.parametrize("batch_size", [1024, 4096])
async def test_every_stage_on_its_worker_gives_the_serial_numbers_bit_for_bit(sample_dir, batch_size):
    """The light stages' worker path (what a batch of >= 65,536 rows takes) kept under test."""
    data = btc_trades(sample_dir, None)
    serial, serial_events, _ = await run_chain(data, batch_size, "serial")
    concurrent, events, _ = await run_chain(data, batch_size, "concurrent", offload_all=True)
    full = len(data["ts_ns"]) // batch_size
    by_stage = OFFLOADED_BY_STAGE["concurrent"]
    assert by_stage["features"] >= full and by_stage["vpin"] >= full
    for key, col in serial.items():
        np.testing.assert_array_equal(concurrent[key], col, err_msg=key)
    assert events == serial_events


async def test_a_batch_at_the_light_threshold_goes_to_the_workers_and_the_smaller_ones_after_it_stay_inline():
    """A replay batch of ``LIGHT_OFFLOAD_MIN_ROWS`` rows takes the light stages' workers; the
    2,000-row batch behind it runs on the loop, and so does a 200-row one (the inline hand-off,
    published while the big batch may still be on a worker): each stage sees them one at a
    time, in order, and the numbers are serial execution's, bit for bit."""
    data = generated_trades(LIGHT_OFFLOAD_MIN_ROWS + 2_200, seed=11)
    data = {k: data[k] for k in ("ts_ns", "price", "size", "side")}
    cut = LIGHT_OFFLOAD_MIN_ROWS + 2_000
    parts = [{k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()}]
    serial, serial_events, _ = await run_chain(parts, LIGHT_OFFLOAD_MIN_ROWS, "serial")
    concurrent, events, _ = await run_chain(parts, LIGHT_OFFLOAD_MIN_ROWS, "concurrent")
    by_stage = OFFLOADED_BY_STAGE["concurrent"]
    assert by_stage["features"] == by_stage["vpin"] == 1  # the big batch only
    assert by_stage["inference"] >= 2 and by_stage["risk"] >= 2  # the 2,000-row one too
    assert len(concurrent["ts_ns"]) == len(data["ts_ns"])
    for key, col in serial.items():
        np.testing.assert_array_equal(concurrent[key], col, err_msg=key)
    assert events == serial_events


async def test_concurrent_stages_give_the_serial_numbers_on_generated_trades():
    data = generated_trades(20_000, seed=3)
    data = {k: data[k] for k in ("ts_ns", "price", "size", "side")}
    serial, serial_events, _ = await run_chain(data, 4096, "serial")
    concurrent, events, offloaded = await run_chain(data, 4096, "concurrent")
    assert offloaded > 0
    for key, col in serial.items():
        np.testing.assert_array_equal(concurrent[key], col, err_msg=key)
    assert events == serial_events


@pytest.mark.parametrize("batch_size", [1024, 1500, 4096])
async def test_inference_on_two_lanes_gives_the_bits_of_one(batch_size):
    """A large batch's rows split between the stream's worker and the stage's second lane
    (concurrent execution): the same predictions as serial execution, on one lane."""
    from nautilus_pipeline.stages.inference import InferenceStage

    data = generated_trades(9_000, seed=5)
    data = {k: data[k] for k in ("ts_ns", "price", "size", "side")}
    serial, serial_events, _ = await run_chain(data, batch_size, "serial")
    concurrent, events, _ = await run_chain(data, batch_size, "concurrent")
    for key, col in serial.items():
        np.testing.assert_array_equal(concurrent[key], col, err_msg=key)
    assert events == serial_events
    assert SPLIT_SEEN["concurrent"] > 0 and SPLIT_SEEN["serial"] == 0
    stage = InferenceStage()
    assert stage.lanes == 2  # the default; the chain above used it
    with pytest.raises(Exception, match="lanes must be 1 or 2"):
        InferenceStage(lanes=3)


@pytest.mark.parametrize(("cores", "workers"), [
    (1, []),
    (2, ["inference"]),
    (3, ["inference", "risk"]),
    (4, ["inference", "risk", "inference-lane2"]),
])
async def test_worker_threads_go_to_the_heavy_stages_while_cores_are_left(sample_dir, cores, workers):
    """``cores``: the loop's thread keeps one; the heavy CPU stages take one each for their
    worker in chain order, then inference's second lane; a stage left without one runs its
    replay batches on the loop. Wherever they run, the numbers are serial execution's."""
    data = btc_trades(sample_dir, None)
    serial, serial_events, _ = await run_chain(data, 4096, "serial")
    concurrent, events, _ = await run_chain(data, 4096, "concurrent", cores=cores)
    by_stage = OFFLOADED_BY_STAGE["concurrent"]
    on_workers = {name for name, calls in by_stage.items() if calls}
    assert on_workers == {w for w in workers if not w.endswith("-lane2")}
    assert (SPLIT_SEEN["concurrent"] > 0) == ("inference-lane2" in workers)
    for key, col in serial.items():
        np.testing.assert_array_equal(concurrent[key], col, err_msg=key)
    assert events == serial_events


async def test_the_pipeline_reports_its_cores_and_what_took_them():
    from nautilus_pipeline.errors import ConfigError
    from nautilus_pipeline.machine import usable_cores

    data = generated_trades(5_000, seed=2)
    data = {k: data[k] for k in ("ts_ns", "price", "size", "side")}
    for cores, expected in ((0, usable_cores()), (3, 3)):
        pipe = Pipeline(chain(), batch_size=4096, slabs=4, memory="host", cores=cores)
        async with pipe:
            pipe.symbols.id_of("BTCUSDT-PERP")
            await pipe.ingest(data)
            stats = pipe.stats()["cores"]
        assert stats["in_use"] == expected
        assert stats["workers"][: min(expected - 1, 2)] == ["inference", "risk"][: min(expected - 1, 2)]
    serial = Pipeline(chain(), batch_size=4096, slabs=4, memory="host", execution="serial", cores=2)
    async with serial:
        assert serial.stats()["cores"] == {"in_use": 2, "workers": []}
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ConfigError, match="cores must be an int >= 0"):
            Pipeline(chain(), cores=bad)


async def test_var_reports_do_not_depend_on_the_batch_size(sample_dir):
    data = btc_trades(sample_dir, 3000)
    _, one, _ = await run_chain(data, 1, "concurrent")
    _, big, _ = await run_chain(data, 4096, "concurrent")
    reports = [e for e in orjson.loads(big["risk"]) if e["kind"] == "var"]
    assert len(reports) >= 6
    held = [e for e in reports if e["position"] != 0]  # flat: every VaR is 0
    assert len(held) >= 2
    assert len({orjson.dumps(e["var"]["mc"]) for e in held}) == len(held), (
        "every report draws fresh paths: the generator advances, it is not re-seeded"
    )
    assert one["risk"] == big["risk"]


# --- the Monte Carlo sampler against a plain reference ----------------------------------
M64 = (1 << 64) - 1


def ref_xoshiro(state: list[int]):
    """xoshiro256+ as published (Blackman & Vigna), on Python ints."""
    s = list(state)
    while True:
        result = (s[0] + s[3]) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = ((s[3] << 45) | (s[3] >> 19)) & M64
        yield result


def ref_bootstrap_losses(state: np.ndarray, r: np.ndarray, horizon: int, n_paths: int,
                         position: float) -> np.ndarray:
    """Path p uses lane p mod LANES; each 64-bit draw gives three steps, its 21-bit fields
    at bits 43, 22 and 1, highest first; an index is floor(u21 · n / 2²¹); the path's steps
    are summed in order."""
    lanes = [ref_xoshiro([int(x) for x in state[j]]) for j in range(LANES)]
    n = len(r)
    out = np.empty(n_paths)
    for group in range(0, n_paths, LANES):
        for j in range(LANES):
            total = 0.0
            draws = []
            for _ in range((horizon + 2) // 3):
                x = next(lanes[j])
                draws += [(x >> 43) & 0x1FFFFF, (x >> 22) & 0x1FFFFF, (x >> 1) & 0x1FFFFF]
            for u in draws[:horizon]:
                total += r[(u * n) >> 21]
            if group + j < n_paths:
                out[group + j] = -position * total
    return out


@pytest.mark.parametrize(("horizon", "n_paths"), [(1, 8), (2, 5), (7, 10), (100, 13)])
def test_the_fused_bootstrap_equals_the_plain_reference(horizon, n_paths):
    r = np.random.default_rng(5).normal(0, 1e-3, 37)
    sampler = McSampler(seed=11, stream=3)
    state = sampler.state.copy()
    got = sampler.bootstrap(r, horizon, n_paths, 2.5e4).copy()
    np.testing.assert_array_equal(got, ref_bootstrap_losses(state, r, horizon, n_paths, 2.5e4))


def test_the_sampler_advances_and_one_seed_fixes_every_report():
    r = np.random.default_rng(1).normal(0, 1e-3, 1000)
    a, b = new_generator("numpy", 7), new_generator("numpy", 7)
    first = [mc_var(r, 1e5, 100, 10_000, generator=a) for _ in range(3)]
    again = [mc_var(r, 1e5, 100, 10_000, generator=b) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not np.array_equal(first[0], first[1])
    other = mc_var(r, 1e5, 100, 10_000, generator=new_generator("numpy", 7, stream=1))
    assert not np.array_equal(other, first[0])
    assert not np.array_equal(splitmix_seed(7, 0), splitmix_seed(7, 1))


def test_the_normal_sampler_has_the_right_moments():
    losses = McSampler(seed=2).normal(0.01, 4, 200_000, 1e4)
    # loss = −1e4 · 0.01 · Σ₄ Z: mean 0, standard deviation 100 · √4 = 200
    assert abs(losses.mean()) < 3 * 200 / np.sqrt(200_000)
    assert abs(losses.std() / 200 - 1) < 0.01


# --- live ingress, lifecycle ------------------------------------------------------------
class Arrivals(Stage):
    name = "arrivals"
    reads = ("ts_ns",)

    def __init__(self):
        self.got = asyncio.Event()
        self.rows = 0

    async def process(self, lease, stream, ctx):
        self.rows += lease.length
        self.got.set()


async def test_a_tick_into_an_idle_pipeline_goes_out_without_waiting_for_the_deadline():
    sink = Arrivals()
    async with Pipeline([sink], batch_size=4096, max_delay_us=60e6, memory="host") as pipe:
        await pipe.publish_tick(TradeTick("X", 1, 1.0, 1.0, 1))
        # a 60 s deadline: the batch must leave once the producer gives the loop back
        await asyncio.wait_for(sink.got.wait(), timeout=10)
        assert sink.rows == 1


async def test_a_burst_published_without_yielding_stays_one_batch():
    sink = Arrivals()
    async with Pipeline([sink], batch_size=4096, max_delay_us=60e6, memory="host") as pipe:
        for i in range(100):
            await pipe.publish_tick(TradeTick("X", i, 1.0, 1.0, 1))
        await asyncio.wait_for(sink.got.wait(), timeout=10)
        await pipe.drain()
    assert pipe.runners[0].metrics.batches == 1 and sink.rows == 100


async def test_a_bus_that_was_not_entered_refuses_to_publish():
    bus = EventBus()
    bus.subscribe("t", lambda e: None)
    with pytest.raises(BusClosedError, match="not running"):
        await bus.publish("t", 1)


async def test_a_failure_during_start_unwinds_what_was_started():
    class Breaks(Stage):
        name = "breaks"
        reads = ("ts_ns",)

        async def bind(self, stream):
            raise RuntimeError("no device")

    from threadpoolctl import threadpool_info

    blas_before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    threads_before = threading.active_count()
    tasks_before = asyncio.all_tasks()
    pipe = Pipeline([Arrivals(), Breaks()], memory="host", blas_threads=1)
    with pytest.raises(RuntimeError, match="no device"):
        await pipe.start()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == tasks_before
    assert pipe.bus.tasks() == []
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas_before
    assert threading.active_count() <= threads_before


@pytest.mark.skipif(
    any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg"))
    or sys.platform != "linux",
    reason="this host has an NVIDIA driver (or is not Linux): asking torch about CUDA is right here",
)
def test_a_cpu_only_run_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from nautilus_pipeline.cli import main\n"
        f"sys.argv = ['nautilus-pipeline', 'run', {str(ROOT / 'pipelines/default.toml')!r},"
        f" '--out', {str(tmp_path)!r}, '--no-progress']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print('torch' in sys.modules, 'mlx.core' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False"


async def test_publishing_on_a_wildcard_topic_is_refused():
    from nautilus_pipeline.errors import ConfigError

    async with EventBus() as bus:
        bus.subscribe("signals.>", lambda e: None)
        for topic in ("signals.*", "signals.>", "signals.**"):
            with pytest.raises(ConfigError, match="wildcards are for subscriptions"):
                await bus.publish(topic, 1)


async def test_publish_nowait_on_a_full_block_queue_raises_would_block():
    from nautilus_pipeline.errors import PipelineError, WouldBlockError

    gate = asyncio.Event()

    async def slow(event):
        await gate.wait()

    async with EventBus() as bus:
        bus.subscribe("t", slow, maxsize=1, overflow="block")
        bus.publish_nowait("t", 1)
        await asyncio.sleep(0)  # the consumer takes it and waits
        bus.publish_nowait("t", 2)
        with pytest.raises(WouldBlockError, match="full") as info:
            bus.publish_nowait("t", 3)
        assert isinstance(info.value, PipelineError)
        gate.set()


async def test_a_stage_error_carries_its_context_as_attributes():
    from nautilus_pipeline.errors import StageError

    class Fails(Stage):
        name = "fails"
        reads = ("ts_ns",)

        async def process(self, lease, stream, ctx):
            raise ValueError("boom")

    pipe = Pipeline([Fails()], batch_size=8, memory="host", on_error="fail_fast")
    with pytest.raises(Exception) as info:
        async with pipe:
            await pipe.ingest({"ts_ns": np.arange(5), "price": np.ones(5), "size": np.ones(5)})
            await pipe.drain()
    err = info.value.__cause__
    assert isinstance(err, StageError)
    assert (err.stage, err.topic, err.rows, err.stream) == ("fails", "pipeline.default.ticks", 5, "cpu")
    assert isinstance(err.batch, int) and isinstance(err.__cause__, ValueError)


def test_a_trade_tick_takes_the_aggressor_side_and_refuses_a_signal_direction():
    import nautilus_pipeline as nt

    assert nt.TradeTick("X", 1, 1.0, 1.0, nt.AggressorSide.SELL).side == -1
    with pytest.raises(nt.ConfigError, match="Side is a signal's direction"):
        nt.TradeTick("X", 1, 1.0, 1.0, nt.Side.BUY)


async def test_a_concurrent_pipeline_lowers_the_gil_switch_interval_only_while_it_runs():
    from nautilus_pipeline.pipeline import GIL_SWITCH_S

    before = sys.getswitchinterval()
    async with Pipeline([Arrivals()], memory="host") as pipe:
        assert sys.getswitchinterval() == pytest.approx(min(before, GIL_SWITCH_S))
        await pipe.ingest({"ts_ns": np.arange(3), "price": np.ones(3), "size": np.ones(3)})
    assert sys.getswitchinterval() == before
    async with Pipeline([Arrivals()], memory="host", execution="serial"):
        assert sys.getswitchinterval() == before


async def test_two_concurrent_pipelines_keep_the_switch_interval_lowered_until_the_last_closes():
    from nautilus_pipeline.pipeline import GIL_SWITCH_S

    before = sys.getswitchinterval()
    lowered = min(before, GIL_SWITCH_S)
    first = Pipeline([Arrivals()], memory="host")
    second = Pipeline([Arrivals()], memory="host")
    await first.start()
    await second.start()
    await first.close()
    assert sys.getswitchinterval() == pytest.approx(lowered)  # the second still runs
    await second.close()
    assert sys.getswitchinterval() == before


async def test_a_stage_whose_finish_fails_does_not_stop_the_others_or_leave_the_bus_running():
    """A recorder on a full disk fails in ``finish()``: the later stages still finish, the bus
    and its consumer tasks are closed, and close() raises that first error afterwards."""
    finished: list[str] = []

    class FailsToFinish(Stage):
        name = "fails_to_finish"
        reads = ("ts_ns",)

        async def process(self, lease, stream, ctx):
            pass

        async def finish(self, ctx):
            finished.append(self.name)
            raise OSError(28, "No space left on device")

    class Finishes(Arrivals):
        name = "finishes"

        async def finish(self, ctx):
            finished.append(self.name)

    tasks_before = asyncio.all_tasks()
    sink = Finishes()
    pipe = Pipeline([FailsToFinish(), sink], memory="host")
    await pipe.start()
    await pipe.publish_tick(TradeTick("X", 1, 1.0, 1.0, 1))
    with pytest.raises(OSError, match="No space left"):
        await pipe.close()
    await asyncio.sleep(0)
    assert finished == ["fails_to_finish", "finishes"]
    assert sink.rows == 1
    assert pipe.bus.closed and pipe.bus.tasks() == []
    assert asyncio.all_tasks() == tasks_before
