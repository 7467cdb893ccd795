"""The one interface every compute stream offers: ``await stream.run(fn, *args)``.

Why streams and not "devices": a stage needs more than a device. It needs an ordered queue
of work (a CUDA stream, an MLX stream, a worker thread) that can be awaited without
blocking the event loop, so that while the GPU works on one stage's batch the loop keeps
feeding the others. Each backend module implements this for its own runtime; the stage
never touches ``torch.cuda`` or ``mlx.core`` directly.

Moving columns. ``to_device(lease, column)`` gives the stage a tensor of a slab column on
the stream's device: a zero-copy view on CPU backends (``torch.from_numpy`` / numpy), or a
copy on a GPU, counted in the pool's statistics and cached on the lease so that the next
GPU stage reading the same column does not copy it again.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from ..memory import Lease


class ComputeStream(abc.ABC):
    """An ordered queue of work on one backend and device."""

    #: Full name as used in preference lists, e.g. ``"torch:cuda"``.
    name: str
    #: Framework family: ``"numpy"``, ``"torch"``, ``"mlx"`` or ``"coreml"``.
    backend: str
    #: Whether data in host slabs must be copied to reach this stream's device.
    needs_copy: bool = False
    #: The ``device`` argument that kernels of ``backend`` take for this stream (torch: the
    #: stream's ``torch.device`` as a string, ``"cuda"``, ``"cpu"``; MLX: ``"gpu"``, ``"cpu"``).
    kernel_device: str | None = None

    @functools.cached_property
    def runner_backend(self) -> str:
        """The model runner's backend name for this stream (``cpu`` runs the numpy runner);
        worked out once, since the inference stage asks for it on every batch."""
        from .registry import runner_backend

        return runner_backend(self.name)

    @abc.abstractmethod
    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on this stream and return its result once complete."""

    async def run_setup(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run set-up work (a stage's warm-up) where the stream's kernels run, off the event
        loop where the stream has a worker; not counted as a batch's call."""
        return await self.run(fn, *args)

    def to_device(self, lease: Lease, column: str) -> Any:
        """The first ``lease.length`` rows of ``column`` as an array of this backend."""
        return lease[column]

    def to_host(self, lease: Lease, column: str, value: Any) -> None:
        """Write ``value`` (an array of this backend) into the lease's ``column``."""
        lease[column][...] = np.asarray(value)

    def synchronize(self) -> None:
        """Block until all work queued on this stream is done (for tests and shutdown)."""

    def close(self) -> None:
        """Release threads and device resources held by the stream."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
