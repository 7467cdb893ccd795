"""Helpers and pytest fixtures for async integration tests of pipelines.

Use it from your own tests with ``pytest_plugins = ["nautilus_pipeline.testing"]`` in
``conftest.py`` (and ``asyncio_mode = "auto"`` for pytest-asyncio), then::

    from nautilus_pipeline.testing import trades_frame

    async def test_my_strategy(pipeline_from, collect):
        pipe = await pipeline_from("default", batch_size=256)
        signals = collect(pipe, "signals.>")
        await pipe.ingest(trades_frame(5000, seed=1), symbol="BTCUSDT-PERP")
        await pipe.drain()
        assert signals.payloads

The fixtures close every pipeline they opened (draining it) at the end of the test, so a
test that fails half-way leaves no task behind. ``ManualClock`` paces replays without
sleeping: its ``sleep`` only moves its time forward.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from .bus import Event, EventBus
from .events import KIND_TRADE, QuoteTick, TradeTick
from .io.replay import ManualClock
from .pipeline import Pipeline
from .stage import Stage

__all__ = [
    "Collector",
    "ManualClock",
    "collect",
    "feed",
    "manual_clock",
    "pipeline_from",
    "run_replay",
    "trades_frame",
]


class Collector:
    """Payloads of every event on a topic pattern, in arrival order."""

    def __init__(self, bus: EventBus, pattern: str):
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self.subscription = bus.subscribe(pattern, self._on_event, name=f"collect:{pattern}",
                                          maxsize=1 << 20)

    def _on_event(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    @property
    def payloads(self) -> list[Any]:
        return [e.payload for e in self.events]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Any]:
        """Wait until at least ``count`` events arrived; raise TimeoutError naming the count."""
        async def _wait() -> None:
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self.subscription.pattern}: {len(self.events)} events after {timeout}s, "
                f"expected {count}"
            ) from None
        return self.payloads


def trades_frame(n: int, *, seed: int = 0, symbol_id: int = 0, start_ns: int = 1_700_000_000_000_000_000,
                 price: float = 60_000.0) -> dict[str, np.ndarray]:
    """``n`` synthetic trades (a random walk, exponential sizes and gaps) as tick columns.

    Pass ``symbol=`` to :meth:`Pipeline.ingest` to name their instrument.
    """
    rng = np.random.default_rng(seed)
    return {
        "ts_ns": start_ns + np.cumsum(rng.exponential(5e6, n)).astype(np.int64),
        "symbol_id": np.full(n, symbol_id, dtype=np.uint32),
        "kind": np.full(n, KIND_TRADE, dtype=np.uint8),
        "price": price * np.exp(np.cumsum(rng.normal(0, 2e-4, n))),
        "size": rng.exponential(0.5, n),
        "side": rng.choice(np.array([-1, 1], dtype=np.int8), n),
        "trade_id": np.arange(n, dtype=np.int64),
    }


async def feed(pipe: Pipeline, ticks: Iterable[TradeTick | QuoteTick]) -> int:
    """Publish ticks one at a time through the micro-batcher; return how many."""
    n = 0
    for tick in ticks:
        await pipe.publish_tick(tick)
        n += 1
    return n


async def run_replay(pipe: Pipeline, replay: Any) -> None:
    """Push a :class:`~nautilus_pipeline.io.Replay` through a running pipeline, then drain."""
    from .app import replay_into

    await replay_into(pipe, replay)
    await pipe.drain()


# --- pytest fixtures -------------------------------------------------------------------
@pytest.fixture
def manual_clock() -> ManualClock:
    """A clock whose ``sleep`` advances its time instantly (for paced replays)."""
    return ManualClock()


@pytest_asyncio.fixture
async def pipeline_from() -> AsyncIterator[Any]:
    """``await pipeline_from(stages_or_toml_path, **pipeline_kwargs)``: a started pipeline.

    With a definition file, keyword arguments override its ``[pipeline]`` settings
    (``batch_size``, ``slabs``, ``memory``, ...). Every pipeline made is closed (drained)
    when the test ends.
    """
    opened: list[Pipeline] = []

    async def make(what: Sequence[Stage] | str | Path, **kwargs: Any) -> Pipeline:
        if isinstance(what, (str, Path)):
            from .app import Run

            pipe = Run(what, outputs=False, pipeline_settings=kwargs).pipeline
        else:
            pipe = Pipeline(list(what), **kwargs)
        await pipe.start()
        opened.append(pipe)
        return pipe

    yield make
    for pipe in reversed(opened):
        await pipe.close()


@pytest.fixture
def collect():
    """``collect(pipe_or_bus, "signals.>")`` → a :class:`Collector` of that topic pattern."""

    def make(target: Pipeline | EventBus, pattern: str) -> Collector:
        bus = target.bus if isinstance(target, Pipeline) else target
        return Collector(bus, pattern)

    return make
