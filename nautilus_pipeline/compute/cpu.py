"""The numpy CPU stream: the reference path and, for small batches, usually the fastest.

Where the work runs: ``offload=False`` inline on the event loop; ``offload=True`` always on
the stream's own worker thread; ``offload=N`` (an int) on the worker for batches of at
least N rows and inline below. The stage runner tells the stream the batch's row count
(:attr:`batch_rows`) before each batch. A thread hop costs tens of µs, more than a live
batch of one row costs to compute, while a replay batch of thousands of rows in the worker
lets the loop and the other stages run beside it (numpy, BLAS and our numba kernels release
the GIL). The threshold is measured: see :mod:`nautilus_pipeline.stage`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import ComputeStream
from .executor import StreamThread


class CpuStream(ComputeStream):
    backend = "numpy"
    needs_copy = False

    def __init__(self, *, offload: bool | int = False, name: str = "cpu"):
        self.name = name
        self.offload = offload
        if offload is True:
            self._min_rows = 0
        elif offload is False:
            self._min_rows = None
        else:
            self._min_rows = int(offload)
        self._thread = StreamThread(f"np-{name}") if self._min_rows is not None else None
        #: Rows of the batch being processed; set by the stage runner.
        self.batch_rows = 0
        #: Calls run on the worker thread and inline (for stats and tests).
        self.offloaded = 0
        self.inline = 0

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._thread is None or self.batch_rows < self._min_rows:
            self.inline += 1
            return fn(*args, **kwargs)
        self.offloaded += 1
        if kwargs:
            return await self._thread.run(lambda: fn(*args, **kwargs))
        return await self._thread.run(fn, *args)

    @property
    def offloads(self) -> bool:
        """Whether large batches run on a worker thread (concurrent execution)."""
        return self._thread is not None

    async def run_setup(self, fn: Callable[..., Any], *args: Any) -> Any:
        """On the worker thread where the stream has one, else inline; not counted."""
        if self._thread is None:
            return fn(*args)
        return await self._thread.run(fn, *args)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()
            self._thread = None
