"""Features stage: the default feature vector per tick, written into the slab.

Thin orchestration around :func:`nautilus_pipeline.kernels.features.features_update_rows`:
per-symbol state is carried between batches and committed only after a batch succeeded,
so every row gets the same numbers whatever the batch size. The vector's width and order
are fixed when the pipeline is built (``names``, default: every trade and quote feature),
and the model that consumes it is told those names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..compute import ComputeStream
from ..errors import ConfigError
from ..events import ColumnSpec
from ..kernels.features import (
    DEFAULT_FEATURE_CONFIG,
    FeatureConfig,
    FeatureTable,
    all_feature_names,
)
from ..memory import Lease
from ..stage import Stage, StageContext

FEATURES_COLUMN = "features"


class FeaturesStage(Stage):
    """Writes ``features`` (float64[n, k]) for every row: trades and quotes, as of that row."""

    reads = ("ts_ns", "symbol_id", "kind", "price", "size", "side", "bid", "ask", "bid_size", "ask_size")

    def __init__(
        self,
        names: Sequence[str] | None = None,
        *,
        config: FeatureConfig = DEFAULT_FEATURE_CONFIG,
        name: str = "features",
        streams: Sequence[str] = ("cpu",),
    ):
        available = all_feature_names(config)
        self.names: tuple[str, ...] = tuple(names) if names is not None else available
        unknown = [n for n in self.names if n not in available]
        if unknown or not self.names:
            raise ConfigError(
                f"features stage: unknown feature names {unknown or '(none given)'}; "
                f"available with this configuration: {list(available)}"
            )
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"features stage: a feature is listed twice in {list(self.names)}")
        self.name = name
        self.streams = tuple(streams)
        self.config = config
        self.writes = (ColumnSpec(FEATURES_COLUMN, np.dtype(np.float64), (len(self.names),), np.nan),)
        index = [available.index(n) for n in self.names]
        self._index = None if index == list(range(len(available))) else np.asarray(index)
        self.table = FeatureTable(config)
        self._out = np.empty((0, len(available)))

    async def start(self, ctx: StageContext) -> None:
        self.table = FeatureTable(self.config)

    def _compute(self, lease: Lease) -> None:
        n = lease.length
        if self._index is None:
            out = lease[FEATURES_COLUMN]
        else:
            if self._out.shape[0] < lease.capacity:
                self._out = np.empty((lease.capacity, self._out.shape[1]))
            out = self._out[:n]
        self.table.update(
            lease["symbol_id"],
            lease["kind"],
            lease["ts_ns"],
            lease["price"],
            lease["size"],
            lease["side"],
            lease["bid"],
            lease["ask"],
            lease["bid_size"],
            lease["ask_size"],
            out,
        )
        if self._index is not None:
            np.take(out, self._index, axis=1, out=lease[FEATURES_COLUMN])

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        await stream.run(self._compute, lease)

    def stats(self) -> dict[str, object]:
        return {"symbols": self.table.symbols, "width": len(self.names)}
