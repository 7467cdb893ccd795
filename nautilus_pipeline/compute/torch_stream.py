"""torch streams: ``torch:cpu``, ``torch:cuda`` (one ``torch.cuda.Stream`` per stage), ``torch:mps``.

CUDA work is launched on the stage's own stream from the stream's worker thread, which
then waits on an event recorded after it; the event loop only awaits that thread. Launching
from the loop thread looked cheaper, but on the lent H200 it blocked the loop for the whole
run of the test's matmuls: first launches create cuBLAS handles and allocations can
synchronise, so "asynchronous" launches are not reliably non-blocking. Host slabs are pinned by the pool on CUDA hosts, which is what makes
``non_blocking=True`` copies actually asynchronous.

Columns copied to the device are cached on the lease under ``(device, column)``. The next
GPU stage reading the same column takes the cached tensor (making its own stream wait on
the producer's stream), so a column crosses the bus once per batch, not once per stage; a
result written back with ``to_host`` stays cached too, so the next stage on the device reads
it there (``has_on_device`` says whether it is: the features stage's GPU path leaves the
features for the inference stage this way, and only the four input columns cross in).

MPS: released torch exposes only the default MPS stream (``torch.mps.synchronize``), so
``torch:mps`` serialises on it and waits in the worker thread; multi-stream MPS is not
public API yet (see ``../shared/BACKENDS.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..memory import Lease
from .base import ComputeStream
from .executor import StreamThread


class TorchStream(ComputeStream):
    backend = "torch"

    def __init__(self, device: str = "cpu", *, offload: bool = False):
        import torch

        self._torch = torch
        self.device = torch.device(device)
        kind = self.device.type
        self.name = f"torch:{kind}"
        self.kernel_device = str(self.device)
        self.needs_copy = kind != "cpu"
        self._cache_tag = str(self.device) if kind != "cuda" else f"cuda:{self.device.index or 0}"
        self.cuda_stream = torch.cuda.Stream(device=self.device) if kind == "cuda" else None
        self._thread = StreamThread(self.name) if (offload or kind != "cpu") else None

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        torch = self._torch
        kind = self.device.type
        if kind == "cuda":
            return await self._thread.run(self._launch_and_wait, fn, args, kwargs)
        if kind == "mps":
            result = fn(*args, **kwargs)
            await self._thread.run(torch.mps.synchronize)
            return result
        if self._thread is None:
            return fn(*args, **kwargs)
        return await self._thread.run(lambda: fn(*args, **kwargs))

    def _launch_and_wait(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        torch = self._torch
        with torch.cuda.stream(self.cuda_stream):
            result = fn(*args, **kwargs)
            done = torch.cuda.Event()
            done.record(self.cuda_stream)
        done.synchronize()
        return result

    def has_on_device(self, lease: Lease, column: str) -> bool:
        """Whether a stage before left ``column`` of this batch on this stream's device."""
        return self.needs_copy and (self._cache_tag, column) in lease.device_cache

    def to_device(self, lease: Lease, column: str) -> Any:
        torch = self._torch
        host = torch.from_numpy(lease[column])
        if not self.needs_copy:
            return host  # zero-copy view of the slab
        key = (self._cache_tag, column)
        cached = lease.device_cache.get(key)
        if cached is not None:
            tensor, producer = cached
            if producer is not None and producer is not self.cuda_stream:
                self.cuda_stream.wait_stream(producer)
                tensor.record_stream(self.cuda_stream)
            return tensor
        if self.cuda_stream is not None:
            with torch.cuda.stream(self.cuda_stream):
                tensor = host.to(self.device, non_blocking=host.is_pinned())
        else:
            tensor = host.to(self.device)
        lease.pool.count_copy("h2d", host.nbytes)
        lease.device_cache[key] = (tensor, self.cuda_stream)
        return tensor

    def to_host(self, lease: Lease, column: str, value: Any) -> None:
        torch = self._torch
        host = torch.from_numpy(lease[column])
        if not self.needs_copy or value.device.type == "cpu":
            host.copy_(value)
            return
        if self.cuda_stream is not None:
            with torch.cuda.stream(self.cuda_stream):
                host.copy_(value, non_blocking=host.is_pinned())
        else:
            host.copy_(value)
        lease.pool.count_copy("d2h", host.nbytes)
        lease.device_cache[(self._cache_tag, column)] = (value, self.cuda_stream)

    def synchronize(self) -> None:
        if self.cuda_stream is not None:
            self.cuda_stream.synchronize()
        elif self.device.type == "mps":
            self._torch.mps.synchronize()

    def close(self) -> None:
        if self._thread is not None:
            self.synchronize()
            self._thread.close()
            self._thread = None
