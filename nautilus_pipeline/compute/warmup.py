"""Start-up work overlapped with the read: CUDA's context, the stages' device and numba kernels.

Why. A run reads (or calibrates VPIN's bucket volume over) its input before the pipeline
starts, for seconds on large files, with the GPU idle; then the start paid, one stage after
the other, CUDA's context and libraries, Triton's first compile of the risk stage's Monte
Carlo kernel (its package hash alone ~0.3 s on the lent H200) and the rest. Here one
thread does that device work while the main thread reads: :func:`start` when a definition
names a usable CUDA stream, :meth:`DeviceWarmup.join` before the pipeline is built. Each
stage class may say what to prepare with a classmethod ``warm_ahead(params, streams, cuda)``
(the risk stage compiles its kernel for its own ``var_paths`` and ``var_horizon``: Triton
specialises on them). Numba kernels are loaded there too: the process's first numba call
also pays numba's own start (~0.7 s on the H200 host, seen as the VPIN stage's bind once
the calibrations were cached), which is then off the start as well.

An optimisation only: a failure here is logged and dropped, and the stage's own start
meets (and reports) it again. The thread is always joined (``join`` in a ``finally``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog

log = structlog.get_logger("nautilus_pipeline.warmup")

CUDA_STREAMS = ("torch:cuda",)


class DeviceWarmup:
    """One thread preparing the CUDA device for the stages of a definition."""

    def __init__(self, stage_defs: Sequence[Any], cuda: bool = True):
        self._defs = list(stage_defs)
        self.cuda = cuda
        self.seconds: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="device-warmup", daemon=True)

    def start(self) -> DeviceWarmup:
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            if self.cuda:
                import torch

                torch.cuda.init()
                x = torch.ones((64, 64), device="cuda")
                (x @ x).sum().item()  # the context, the allocator and cuBLAS loaded
            for sd in self._defs:
                hook = getattr(sd.cls, "warm_ahead", None)
                if hook is not None and sd.params is not None:
                    hook(sd.params, tuple(sd.streams), self.cuda)
            if self.cuda:
                torch.cuda.synchronize()
        except Exception as exc:  # the stage's own start meets it again, and says so
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("device_warmup_failed", error=self.error)
        self.seconds = time.perf_counter() - t0
        log.info("device_warmup", s=round(self.seconds, 3), error=self.error)


def start(stage_defs: Sequence[Any]) -> DeviceWarmup | None:
    """A started :class:`DeviceWarmup` when a stage names a usable CUDA stream (CUDA and
    every stage's ``warm_ahead``), else None: a CPU run's numba start stays in its bind,
    where nothing else waits on it."""
    wanted = any(s.startswith(CUDA_STREAMS) for sd in stage_defs for s in (sd.streams or ()))
    if not wanted:
        return None
    from .registry import unusable_reason

    if unusable_reason("torch:cuda") is not None:
        return None
    return DeviceWarmup(stage_defs).start()
