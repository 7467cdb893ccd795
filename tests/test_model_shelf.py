"""The runner shelf: a closed stage's runners serve the next pipeline of the process (a batch
worker's next job builds no runner, captures no CUDA graph), never two stages at once, and
the outputs are those of freshly built runners."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from model_helpers import SPEC, reference, rows, weights

from nautilus_pipeline.batch import replay_job
from nautilus_pipeline.model import shelf
from nautilus_pipeline.model.runners import runner_usable

KINDS = ("signals", "vpin", "risk", "trace")  # the data outputs (latency is timing)


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


@pytest.fixture(autouse=True)
def empty_shelf():
    shelf.clear()
    yield
    shelf.clear()


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


@pytest.mark.skipif(not runner_usable("torch:cpu")[0], reason="torch not installed")
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
