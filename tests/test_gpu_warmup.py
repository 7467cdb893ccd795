"""The device warm-up that overlaps the read: it runs where a stage names a usable CUDA
stream, prepares each stage's kernels through its ``warm_ahead`` hook, and never fails a
run (a failure is logged and kept; the stage's own start meets it again)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from nautilus_pipeline import config
from nautilus_pipeline.compute import unusable_reason, warmup
from nautilus_pipeline.stages import RiskStage


@dataclass
class FakeDef:  # a StageDef's fields that the warm-up reads
    cls: type
    params: object
    streams: tuple[str, ...]


class Exploding:
    calls = 0

    @classmethod
    def warm_ahead(cls, params, streams, cuda):
        cls.calls += 1
        raise RuntimeError("kernel failed to compile (injected)")


def test_no_cuda_stream_named_no_warmup():
    d = config.load("pipelines/default.toml")
    cpu_only = [FakeDef(sd.cls, sd.params, ("cpu",)) for sd in d.stages]
    assert warmup.start(cpu_only) is None


@pytest.mark.skipif(unusable_reason("torch:cuda") is None, reason="this host has a usable CUDA device")
def test_an_unusable_cuda_device_starts_nothing():
    assert warmup.start(config.load("pipelines/gpu.toml").stages) is None


def test_a_failing_warmup_is_kept_and_dropped():
    cuda = unusable_reason("torch:cuda") is None
    w = warmup.DeviceWarmup([FakeDef(Exploding, object(), ("torch:cuda",))], cuda=cuda).start()
    w.join()
    assert Exploding.calls == 1 and "injected" in w.error  # logged, not raised
    assert w.seconds is not None


def test_the_stages_warm_their_kernels_ahead_on_the_host():
    """Every hook of the GPU pipeline's stages runs without a device (cuda=False)."""
    d = config.load("pipelines/gpu.toml")
    w = warmup.DeviceWarmup(d.stages, cuda=False).start()
    w.join()
    assert w.error is None, w.error
    assert {sd.cls.__name__ for sd in d.stages if hasattr(sd.cls, "warm_ahead")} >= {
        "FeaturesStage", "VpinStage", "RiskStage"}


@pytest.mark.gpu
@pytest.mark.skipif(unusable_reason("torch:cuda") is not None,
                    reason=f"torch:cuda: {unusable_reason('torch:cuda')}")
def test_the_gpu_pipelines_warmup_prepares_the_risk_kernel():
    d = config.load("pipelines/gpu.toml")
    assert any(sd.cls is RiskStage for sd in d.stages)
    w = warmup.start(d.stages)
    assert w is not None
    w.join()
    assert w.error is None and w.seconds is not None
