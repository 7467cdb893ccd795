"""A single worker thread per stream, so that work queued on one stream keeps its order.

Why one thread and not a shared pool: a stream is ordered by definition (CUDA, MLX), and
MLX streams may only be used on the thread that created them. numpy and torch release the
GIL in their kernels, so a long kernel in the worker does not stall the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any


class StreamThread:
    """Runs callables in order on one dedicated thread; awaitable from the event loop."""

    def __init__(self, name: str, initializer: Callable[[], None] | None = None):
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=initializer
        )

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Queue ``fn(*args)`` from any thread; the caller waits on the future."""
        return self._pool.submit(fn, *args)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run synchronously on the stream's thread (used outside the loop)."""
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
