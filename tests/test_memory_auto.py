"""``memory="auto"``: a pipeline pins its slabs only where one of its stages runs on torch's
CUDA stream. An all-CPU definition on a GPU host used to get pinned slabs (torch's import and
a CUDA context per process, seconds per batch worker on the H200 host, for copies that never
happen). The GPU case needs a CUDA device and skips with the reason elsewhere."""

from __future__ import annotations

import sys

import pytest

from nautilus_pipeline.compute import unusable_reason
from nautilus_pipeline.compute.registry import first_usable
from nautilus_pipeline.memory import auto_memory
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stages import FeaturesStage, InferenceStage, VpinStage

_CUDA = unusable_reason("torch:cuda")


@pytest.mark.parametrize(("streams", "want"), [
    (["cpu"], "host"),
    (["cpu", "cpu", "cpu"], "host"),
    (["mlx:gpu", "cpu"], "host"),          # MLX reads host memory through its own copies
    (["cpu", "torch:cuda"], "pinned"),
    (["cpu", "torch:cuda:1"], "pinned"),
    (["torch:cpu"], "host"),
])
def test_auto_memory_pins_only_for_a_torch_cuda_stream(streams, want):
    assert auto_memory(streams) == want


def test_first_usable_matches_the_stream_a_stage_gets():
    assert first_usable(["cpu"]) == "cpu"
    assert first_usable(["coreml:ane", "torch:mps", "cpu"]) == (
        "cpu" if sys.platform != "darwin" else first_usable(["coreml:ane", "torch:mps", "cpu"]))
    want = "torch:cuda" if _CUDA is None else "cpu"
    assert first_usable(["torch:cuda", "cpu"]) == want


def test_an_all_cpu_pipeline_gets_host_slabs_on_any_host():
    inference = InferenceStage(streams=("cpu",))
    pipe = Pipeline([FeaturesStage(inference.input_names), inference, VpinStage(bucket_volume=10.0)],
                    batch_size=64, slabs=2, memory="auto")
    assert pipe.pool.memory == "host"


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA is not None, reason=f"torch:cuda: {_CUDA}")
def test_a_pipeline_with_a_cuda_stage_gets_pinned_slabs():
    inference = InferenceStage(streams=("torch:cuda", "cpu"))
    pipe = Pipeline([FeaturesStage(inference.input_names), inference], batch_size=64, slabs=2,
                    memory="auto")
    assert pipe.pool.memory == "pinned"
