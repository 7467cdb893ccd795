"""The numpy CPU stream: the reference path and, for small batches, usually the fastest.

By default work runs inline on the event loop: for the small kernels of a live pipeline a
thread hop (~20-50 µs) costs more than the kernel. With ``offload=True`` each call runs
on the stream's own worker thread, so a long kernel (a large replay batch, a Monte Carlo
VaR) does not block the loop while numpy releases the GIL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import ComputeStream
from .executor import StreamThread


class CpuStream(ComputeStream):
    backend = "numpy"
    needs_copy = False

    def __init__(self, *, offload: bool = False, name: str = "cpu"):
        self.name = name
        self.offload = offload
        self._thread = StreamThread(f"np-{name}") if offload else None

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._thread is None:
            return fn(*args, **kwargs)
        if kwargs:
            return await self._thread.run(lambda: fn(*args, **kwargs))
        return await self._thread.run(fn, *args)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()
            self._thread = None
