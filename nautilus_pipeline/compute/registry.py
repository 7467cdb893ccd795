"""Which compute streams are usable here, and choosing one from a stage's preference list.

A stage asks for an ordered preference list such as
``["coreml:ane", "mlx:gpu", "torch:cuda", "cpu"]`` and gets the first usable stream; the
choice and the reason each earlier entry was skipped are logged once, at build time, so
"why is my model on the CPU?" is answered by the log (and by ``nautilus-pipeline
devices``). The entry after the chosen one that is also usable becomes the stage's
fallback for batches that fail at run time (``cpu`` when none is listed).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from ..errors import BackendUnavailableError, ConfigError
from .base import ComputeStream
from .coreml_stream import COMPUTE_UNITS, coreml_unusable_reason

log = structlog.get_logger("nautilus_pipeline.compute")

STREAM_NAMES: tuple[str, ...] = (
    "coreml:ane",
    "coreml:all",
    "coreml:cpu",
    "mlx:gpu",
    "mlx:cpu",
    "torch:cuda",
    "torch:mps",
    "torch:cpu",
    "cpu",
)
_ALIASES = {"numpy": "cpu", "numpy:cpu": "cpu", "torch": "torch:cpu", "mlx": "mlx:cpu"}


@dataclass(frozen=True)
class BackendInfo:
    name: str
    usable: bool
    reason: str  # why not, or what it runs on


def canonical(name: str) -> str:
    """Normalise a stream name (``numpy`` → ``cpu``); validate it; keep a device index."""
    name = _ALIASES.get(name, name)
    base = name.rsplit(":", 1)[0] if name.count(":") == 2 else name
    if base not in STREAM_NAMES:
        raise ConfigError(f"unknown compute stream {name!r}: use one of {list(STREAM_NAMES)}")
    return name


def runner_backend(name: str) -> str:
    """The model runner / kernel backend name of a stream name: ``numpy`` for the CPU
    stream (``cpu``, ``numpy``), the canonical stream name otherwise (``torch:cuda``)."""
    name = canonical(name)
    return "numpy" if name == "cpu" else name


def _no_nvidia_driver() -> bool:
    """True when this host visibly has no NVIDIA driver (Linux: no /proc/driver/nvidia, no
    /dev/nvidiactl, no WSL GPU): then CUDA is ruled out without importing torch or MLX."""
    if sys.platform != "linux":
        return sys.platform == "darwin"
    return not any(
        os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg")
    )


@functools.cache
def unusable_reason(name: str) -> str | None:
    """None when the stream can run here, else a one-line reason (cached per process).

    Answers that need no import come first: importing torch costs ~0.8 s and ~180 MB, which
    a CPU-only run should not pay to learn that there is no CUDA here.
    """
    name = canonical(name)
    family, _, rest = name.partition(":")
    if family == "cpu":
        return None
    if family in ("torch", "mlx") and importlib.util.find_spec(family) is None:
        return f"{family} is not installed (pip install 'nautilus-pipeline[{family}]')"
    if name.startswith("torch:cuda") and _no_nvidia_driver():
        return "no CUDA device (no NVIDIA driver on this host)"
    if name == "torch:mps" and sys.platform != "darwin":
        return "MPS needs macOS on Apple silicon"
    if name == "mlx:gpu" and sys.platform != "darwin" and _no_nvidia_driver():
        return "no Metal or CUDA device for MLX (no NVIDIA driver on this host)"
    if family == "torch":
        try:
            import torch
        except ImportError:
            return "torch is not installed (pip install 'nautilus-pipeline[torch]')"
        kind, _, index = rest.partition(":")
        if kind == "cuda":
            if not torch.cuda.is_available():
                built = torch.version.cuda or "none"
                return f"no CUDA device (torch {torch.__version__}, built for CUDA {built})"
            if index and int(index) >= torch.cuda.device_count():
                return f"no CUDA device {index} (found {torch.cuda.device_count()})"
        if kind == "mps" and not torch.backends.mps.is_available():
            return "MPS needs macOS on Apple silicon"
        return None
    if family == "mlx":
        try:
            import mlx.core as mx
        except ImportError:
            return "mlx is not installed (pip install 'nautilus-pipeline[mlx]')"
        if rest == "gpu" and not mx.is_available(mx.gpu):
            return "no Metal or CUDA device for MLX (this MLX build is CPU-only)"
        return None
    if family == "coreml":
        return coreml_unusable_reason(rest)
    return f"unknown compute stream {name!r}"  # pragma: no cover


def usable(name: str) -> tuple[bool, str]:
    """``(True, what it runs on)`` or ``(False, why not)``: the one answer every part uses."""
    try:
        reason = unusable_reason(name)
    except ConfigError as exc:
        return False, str(exc)
    return (True, _describe_usable(canonical(name))) if reason is None else (False, reason)


def discover() -> list[BackendInfo]:
    """Every known stream with whether it is usable here and why (not)."""
    out = []
    for name in STREAM_NAMES:
        reason = unusable_reason(name)
        out.append(BackendInfo(name, reason is None, reason or _describe_usable(name)))
    return out


def _describe_usable(name: str) -> str:
    family, _, kind = name.partition(":")
    kind = kind.split(":")[0]
    if family == "cpu":
        return "numpy on the CPU"
    if name == "torch:cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    if family == "torch":
        import torch

        return f"torch {torch.__version__} on {kind}"
    if family == "mlx":
        import mlx.core as mx

        return f"mlx {mx.__version__} on {kind}"
    return f"Core ML, compute units {COMPUTE_UNITS[kind]}"


def create_stream(name: str, *, offload: bool | int = False) -> ComputeStream:
    """Build a stream by name; raise BackendUnavailableError with the reason if unusable."""
    name = canonical(name)
    reason = unusable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"compute stream {name!r} is not usable here: {reason}")
    family, _, rest = name.partition(":")
    if family == "cpu":
        from .cpu import CpuStream

        return CpuStream(offload=offload)
    if family == "torch":
        from .torch_stream import TorchStream

        return TorchStream(rest, offload=offload)
    if family == "mlx":
        from .mlx_stream import MlxStream

        return MlxStream(rest)
    from .coreml_stream import CoreMLStream

    return CoreMLStream(rest)


@dataclass(frozen=True)
class Selection:
    """The stream a stage got, its run-time fallback, and what was skipped and why."""

    primary: str
    fallback: str | None
    skipped: tuple[tuple[str, str], ...]


def first_usable(preferences: Sequence[str]) -> str:
    """The stream ``choose`` will pick, without its log line (``"cpu"`` when none is
    usable: ``choose`` raises for that case when the stage starts)."""
    return next((canonical(p) for p in preferences if unusable_reason(p) is None), "cpu")


def choose(preferences: list[str] | tuple[str, ...], *, stage: str = "?") -> Selection:
    """Pick the first usable stream of ``preferences`` (and the next usable as fallback)."""
    if not preferences:
        raise ConfigError(f"stage {stage!r}: empty compute stream preference list")
    prefs = [canonical(p) for p in preferences]
    skipped: list[tuple[str, str]] = []
    usable = []
    for p in prefs:
        reason = unusable_reason(p)
        if reason is None:
            usable.append(p)
        elif not usable:
            skipped.append((p, reason))
    if not usable:
        raise BackendUnavailableError(
            f"stage {stage!r}: none of the compute streams {prefs} is usable here: "
            + "; ".join(f"{n}: {r}" for n, r in skipped)
            + ". Add 'cpu' to the list to always have a fallback"
        )
    primary = usable[0]
    fallback = usable[1] if len(usable) > 1 else ("cpu" if primary != "cpu" else None)
    log.info(
        "stream_selected",
        stage=stage,
        stream=primary,
        fallback=fallback,
        skipped=[f"{n}: {r}" for n, r in skipped] or None,
    )
    return Selection(primary, fallback, tuple(skipped))
