"""The device warm-up that overlaps the read: it runs where a stage names a usable CUDA
stream, prepares each stage's kernels through its ``warm_device`` hook, and never fails a
run (a failure is logged and kept; the stage's own start meets it again)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from nautilus_pipeline import config
from nautilus_pipeline.compute import unusable_reason, warmup
from nautilus_pipeline.stages import RiskStage


@dataclass
class FakeDef:
    cls: type
    params: object
    streams: tuple[str, ...]


class Exploding:
    calls = 0

    @classmethod
    def warm_device(cls, params, streams):
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
    w = warmup.DeviceWarmup([FakeDef(Exploding, object(), ("torch:cuda",))]).start()
    w.join()
    assert w.error is not None and w.seconds is not None  # logged, not raised
    if unusable_reason("torch:cuda") is None:
        assert Exploding.calls == 1 and "injected" in w.error


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
