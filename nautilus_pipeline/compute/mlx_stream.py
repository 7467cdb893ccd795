"""MLX streams: ``mlx:gpu`` (Metal on a Mac, CUDA where MLX's CUDA build is installed) and
``mlx:cpu``.

MLX is lazy: ``fn`` builds a graph and ``mx.eval`` runs it. Both happen on the stream's
own worker thread, because in recent MLX a stream made by ``mx.new_stream`` may only be
used on the thread that created it; so the stream is created in that thread's
initializer. The event loop awaits the thread and is never blocked by evaluation.

Moving columns: ``mx.array(numpy)`` copies (counted) and the copy is cached on the lease
under ``(stream name, column)``, so two stages on this device copy a column once per
batch. With a pool in ``unified`` memory the slab columns are MLX arrays already, and
``to_device`` slices them without a copy, except float64 columns: no MLX GPU has float64,
so those stay on the host and ``mlx:gpu`` reads them as float32 copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..memory import Lease
from .base import ComputeStream
from .executor import StreamThread


class MlxStream(ComputeStream):
    backend = "mlx"

    def __init__(self, device: str = "gpu"):
        import mlx.core as mx

        self._mx = mx
        self.device_kind = device
        self.name = f"mlx:{device}"
        self.kernel_device = device
        self.needs_copy = False  # unified memory on Apple silicon; CPU otherwise
        self._stream = None
        self._thread = StreamThread(self.name, initializer=self._make_stream)

    def _make_stream(self) -> None:
        mx = self._mx
        self._stream = mx.new_stream(mx.gpu if self.device_kind == "gpu" else mx.cpu)

    def _call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        mx = self._mx
        with mx.stream(self._stream):
            result = fn(*args, **kwargs)
            if isinstance(result, mx.array):
                mx.eval(result)
            elif isinstance(result, (tuple, list)):
                mx.eval(*[r for r in result if isinstance(r, mx.array)])
        return result

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self._thread.run(self._call, fn, args, kwargs)

    def to_device(self, lease: Lease, column: str) -> Any:
        """The column as an MLX array: a slice of a unified slab (no copy), else a counted
        copy, cached on the lease so the next stage on this device takes it as is.

        On ``mlx:gpu`` float64 columns arrive as float32 (no MLX GPU has float64); the
        float64 source stays on the host.
        """
        unified = lease.slab.mlx_columns
        if unified is not None and column in unified:
            return unified[column][: lease.length]
        key = (self.name, column)
        cached = lease.device_cache.get(key)
        if cached is not None:
            return cached
        host = lease[column]
        if self.device_kind == "gpu" and host.dtype == np.float64:
            host = host.astype(np.float32)
        lease.pool.count_copy("h2d", host.nbytes)
        # mx.array would turn float64 into float32 unless told: name the dtype
        value = self._mx.array(host, dtype=getattr(self._mx, host.dtype.name))
        lease.device_cache[key] = value
        return value

    def to_host(self, lease: Lease, column: str, value: Any) -> None:
        """Write ``value`` into the slab column (counted) and keep it as that column's copy
        on this device, so a following stage here reads it without another copy."""
        unified = lease.slab.mlx_columns
        if unified is not None and column in unified:
            self._mx.eval(value)
            lease[column][...] = np.asarray(value)
            return
        lease[column][...] = np.asarray(value)
        lease.pool.count_copy("d2h", lease[column].nbytes)
        lease.mark_written([column], device=self.name)
        lease.device_cache[(self.name, column)] = value

    def synchronize(self) -> None:
        self._thread.call(self._mx.synchronize)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()
            self._thread = None
