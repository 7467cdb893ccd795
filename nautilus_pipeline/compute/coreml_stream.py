"""Core ML streams: ``coreml:ane`` (CPU and Neural Engine), ``coreml:all``, ``coreml:cpu``.

A Core ML stream does not run arbitrary functions on the Neural Engine: the ANE only runs
compiled Core ML models. The stream carries the compute units that a model is loaded with
(``compute_units``) and runs ``predict`` calls on its worker thread, which is where Core ML
blocks. Prediction exists only on macOS; elsewhere :func:`coreml_unusable_reason` says so
and the stage falls back along its preference list (conversion still works on Linux).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

from .base import ComputeStream
from .executor import StreamThread

COMPUTE_UNITS = {"ane": "CPU_AND_NE", "all": "ALL", "cpu": "CPU_ONLY", "gpu": "CPU_AND_GPU"}


def coreml_unusable_reason(units: str) -> str | None:
    """None when Core ML can predict here with these units, else why not."""
    if units not in COMPUTE_UNITS:
        return f"unknown Core ML compute units {units!r}: use one of {sorted(COMPUTE_UNITS)}"
    if platform.system() != "Darwin":
        return f"Core ML prediction needs macOS (this is {platform.system()})"
    try:
        import coremltools as ct
    except ImportError:
        return "coremltools is not installed (pip install 'nautilus-pipeline[coreml]')"
    if units == "ane":
        major = int(platform.mac_ver()[0].split(".")[0] or 0)
        if major < 13:
            return "the Neural Engine compute unit (CPU_AND_NE) needs macOS 13 or newer"
        if platform.machine() != "arm64":
            return "the Neural Engine exists on Apple silicon only (this Mac is Intel)"
    if not hasattr(ct.ComputeUnit, COMPUTE_UNITS[units]):
        return f"this coremltools has no ComputeUnit.{COMPUTE_UNITS[units]}"
    return None


class CoreMLStream(ComputeStream):
    backend = "coreml"
    needs_copy = False

    def __init__(self, units: str = "ane"):
        self.units = units
        self.name = f"coreml:{units}"
        self._thread = StreamThread(self.name)

    @property
    def compute_units(self) -> Any:
        import coremltools as ct

        return getattr(ct.ComputeUnit, COMPUTE_UNITS[self.units])

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self._thread.run(lambda: fn(*args, **kwargs))

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()
            self._thread = None
