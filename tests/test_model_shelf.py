"""The runner shelf: a closed stage's runners serve the next pipeline of the process (a batch
worker's next job builds no runner, captures no CUDA graph), never two stages at once, and
the outputs are those of freshly built runners."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from model_helpers import SPEC, reference, rows, weights

from nautilus_pipeline.batch import replay_job
from nautilus_pipeline.config import find_definition, load
from nautilus_pipeline.model import shelf
from nautilus_pipeline.model.runners import runner_usable

KINDS = ("signals", "vpin", "risk", "trace")  # the data outputs (latency is timing)
TORCH_CPU_OK, TORCH_CPU_WHY = runner_usable("torch:cpu")
needs_torch_cpu = pytest.mark.skipif(not TORCH_CPU_OK, reason=f"torch:cpu: {TORCH_CPU_WHY}")


def table_bytes(t: pa.Table) -> bytes:
    """The table's Arrow IPC bytes: equal bit for bit, NaN included (``equals`` says NaN ≠ NaN)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t.combine_chunks())
    return sink.getvalue().to_pybytes()


def assert_same_outputs(first, second) -> None:
    for kind in KINDS:
        a, b = pq.read_table(first.paths[kind]), pq.read_table(second.paths[kind])
        assert a.num_rows == b.num_rows > 0 and table_bytes(a) == table_bytes(b), kind


def on_streams(streams: tuple[str, ...], **values):
    """The default definition with its inference stage on ``streams`` (and ``values``)."""
    d = load(find_definition("default"))
    return replace(d, stages=[replace(sd, streams=streams, values={**sd.values, **values})
                              if sd.name == "inference" else sd for sd in d.stages])


@pytest.fixture(autouse=True)
def empty_shelf():
    """The shelf on, as in a batch worker (``executors._worker_setup``), empty before and after
    (a test before may have run a worker's set-up in this process)."""
    shelf.enable(False)
    shelf.enable()
    yield
    shelf.enable(False)


def counting(monkeypatch) -> list[str]:
    """The backends the shelf had to build a runner for, in order."""
    built: list[str] = []
    make = shelf.make_runner

    def counted(backend, *a, **k):
        built.append(backend)
        return make(backend, *a, **k)

    monkeypatch.setattr(shelf, "make_runner", counted)
    return built


def test_a_given_back_runner_is_lent_again_for_the_same_model_and_options(monkeypatch):
    built = counting(monkeypatch)
    w = weights(1)
    a = shelf.take_runner("numpy", SPEC, w)
    shelf.give_back(a)
    shelf.give_back(a)  # twice (a stage's runner is in its calibration too): still shelved
    assert shelf.shelved() == 1
    assert shelf.take_runner("numpy", SPEC, w) is a and built == ["numpy"]
    other = shelf.take_runner("numpy", SPEC, weights(2))  # other weights: another runner
    assert other is not a and built == ["numpy", "numpy"]
    x = rows(w, 37)
    np.testing.assert_allclose(a.predict(x), reference(SPEC, w, x), atol=1e-5, rtol=0)


def test_with_the_shelf_off_a_given_back_runner_is_closed(monkeypatch):
    shelf.enable(False)  # outside batch workers: a closed stage frees its runners' memory
    built = counting(monkeypatch)
    w = weights(1)
    a = shelf.take_runner("numpy", SPEC, w)
    closed = []
    monkeypatch.setattr(a, "close", lambda: closed.append(a))
    shelf.give_back(a)
    assert closed == [a] and shelf.shelved() == 0
    assert shelf.take_runner("numpy", SPEC, w) is not a and built == ["numpy", "numpy"]


def test_a_runner_given_back_broken_is_closed_and_a_late_second_give_back_is_ignored(monkeypatch):
    w = weights(1)
    a = shelf.take_runner("numpy", SPEC, w)
    closed = []
    monkeypatch.setattr(a, "close", lambda: closed.append(a))
    shelf.give_back(a, broken=True)
    assert closed == [a] and shelf.shelved() == 0
    b = shelf.take_runner("numpy", SPEC, w)
    shelf.give_back(b)
    c = shelf.take_runner("numpy", SPEC, w)  # b again, lent to a second stage
    assert c is b
    shelf.give_back(b)  # the second stage's: shelved
    shelf.give_back(b)  # a repeated call for that loan: nothing
    assert shelf.shelved() == 1


def test_threads_taking_and_giving_back_never_share_a_runner():
    import threading

    w = weights(1)
    in_use: set[int] = set()
    shared: list[int] = []
    guard = threading.Lock()

    def borrow() -> None:
        for _ in range(200):
            r = shelf.take_runner("numpy", SPEC, w)
            with guard:
                if id(r) in in_use:
                    shared.append(id(r))
                in_use.add(id(r))
            with guard:
                in_use.discard(id(r))
            shelf.give_back(r)

    threads = [threading.Thread(target=borrow) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shared == [] and shelf.shelved() == 1


def test_two_stages_alive_at_once_get_two_runners_and_the_shelf_keeps_one(monkeypatch):
    built = counting(monkeypatch)
    w = weights(1)
    a, b = shelf.take_runner("numpy", SPEC, w), shelf.take_runner("numpy", SPEC, w)
    assert a is not b and built == ["numpy", "numpy"]
    closed = []
    monkeypatch.setattr(b, "close", lambda: closed.append(b))
    shelf.give_back(a)
    shelf.give_back(b)  # one of this key is shelved already: b is closed
    assert shelf.shelved() == 1 and closed == [b]
    assert shelf.take_runner("numpy", SPEC, w) is a


@needs_torch_cpu
def test_options_are_part_of_the_key(monkeypatch):
    built = counting(monkeypatch)
    w = weights(1)
    eager = shelf.take_runner("torch:cpu", SPEC, w)
    shelf.give_back(eager)
    script = shelf.take_runner("torch:cpu", SPEC, w, mode="script")
    assert script is not eager and built == ["torch:cpu", "torch:cpu"]


def test_a_second_job_in_the_process_builds_no_runner_and_writes_the_same_outputs(
        sample_dir, tmp_path, monkeypatch):
    built = counting(monkeypatch)
    files = [sample_dir / "binance-spot-ethusdt-trades-20240808.csv"]
    first = replay_job("default", files, tmp_path / "a", None)
    n_first = len(built)
    assert n_first >= 1 and shelf.shelved() >= 1
    second = replay_job("default", files, tmp_path / "b", None)
    assert len(built) == n_first, f"the second job built {built[n_first:]}"
    assert first.paths.keys() == second.paths.keys()
    assert_same_outputs(first, second)


def test_a_stage_whose_runner_raised_closes_it_instead_of_shelving_it(sample_dir, tmp_path, monkeypatch):
    from nautilus_pipeline.model.numpy_runner import NumpyRunner
    from nautilus_pipeline.stages import inference

    monkeypatch.setattr(inference, "LIVE_ROWS", 0)  # no fixed-order pass: every batch calls the runner
    monkeypatch.setattr(inference.InferenceStage, "_fixed_for", lambda self, stream: None)

    def fails(self, x, out=None):
        raise RuntimeError("device lost")

    monkeypatch.setattr(NumpyRunner, "predict", fails)
    monkeypatch.setattr(NumpyRunner, "predict_tiled", fails)  # what the stage calls
    files = [sample_dir / "binance-spot-ethusdt-trades-20240808.csv"]
    result = replay_job(on_streams(("cpu",)), files, tmp_path / "a", None)  # numpy's, on any host
    assert result.ticks["failed_in_stages"] == 6106  # the stage's batches failed (isolated), the job ended
    assert shelf.shelved() == 0


@needs_torch_cpu
def test_a_calibrated_route_over_three_jobs_builds_its_runners_once(sample_dir, tmp_path, monkeypatch):
    built = counting(monkeypatch)
    files = [sample_dir / "binance-spot-ethusdt-trades-20240808.csv"]
    d = on_streams(("torch:cpu", "cpu"), route="calibrated")
    first = replay_job(d, files, tmp_path / "0", None)
    after_first = list(built)
    assert "torch:cpu" in after_first
    later = [replay_job(d, files, tmp_path / str(i), None) for i in (1, 2)]
    assert built == after_first, f"later jobs built {built[len(after_first):]}"
    assert_same_outputs(first, later[-1])


@pytest.mark.gpu
@pytest.mark.skipif(not runner_usable("torch:cuda")[0],
                    reason=f"torch:cuda: {runner_usable('torch:cuda')[1]}")
def test_a_second_gpu_job_captures_no_cuda_graph_again(sample_dir, tmp_path, monkeypatch):
    from nautilus_pipeline.model.torch_runner import TorchRunner

    captures = []
    capture = TorchRunner._capture
    monkeypatch.setattr(TorchRunner, "_capture", lambda self, b: captures.append(b) or capture(self, b))
    files = [sample_dir / "binance-um-btcusdt-trades-20240808.csv"]
    first = replay_job("gpu", files, tmp_path / "a", None)
    n_first = len(captures)
    assert n_first >= 1
    second = replay_job("gpu", files, tmp_path / "b", None)
    assert len(captures) == n_first
    assert_same_outputs(first, second)
