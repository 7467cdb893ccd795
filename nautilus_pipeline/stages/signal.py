"""Signal stage: the sink. Publishes the risk stage's signals; knows no rule.

The trading rule (model probability + toxic flow + kill switch → side, strength, target,
``kernels.signal``) is applied by the risk stage, because the account that fills a signal
and the kill switch that a fill trips are one recursion with it (``stages/risk.py``). The
risk stage writes the final ``signal_*`` columns; this stage turns every row marked
``signal_emit`` (a symbol's (side, target) changed) into a
:class:`~nautilus_pipeline.events.Signal` on ``signals.<symbol>``, in row order. It is the
last stage: when it returns, the bus releases the batch back to the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from .. import topics
from ..compute import ComputeStream
from ..events import Side, Signal
from ..kernels.signal import reason_names
from ..memory import Lease
from ..stage import NOT_NOW, Stage, StageContext

_SIDES = {1: Side.BUY, -1: Side.SELL, 0: Side.FLAT}

_RULE_KEYS = ("long_threshold", "short_threshold", "max_position", "sizing", "step_aside_on_toxic")


class SignalStage(Stage):
    """Reads the risk stage's ``signal_*`` columns; publishes ``Signal`` events on change."""

    reads = ("ts_ns", "symbol_id", "signal_side", "signal_strength", "signal_target",
             "signal_reasons", "signal_emit")
    writes = ()
    offload = False  # it never calls its stream (a scalar read per batch): no worker, no core

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        k: f"the signal rule is the risk stage's now: write it there as "
           f"signal = {{ {k} = ... }} (pipelines/README.md)"
        for k in _RULE_KEYS
    }
    """Keys this stage took before the rule moved, and where they went (config says so)."""

    def __init__(
        self,
        *,
        name: str = "signal",
        streams: Sequence[str] = ("cpu",),
        topic_prefix: str = topics.SIGNALS,
    ):
        self.name = name
        self.streams = tuple(streams)
        self.topic_prefix = topic_prefix

    async def start(self, ctx: StageContext) -> None:
        self.emitted = 0
        self.by_side = {s.value: 0 for s in Side}
        self._topics: dict[int, tuple[str, str]] = {}  # symbol id → (name, topic)

    def process_now(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> object:
        """A live tick that changes no signal (most): one scalar read."""
        if lease.length == 1 and not lease.slab.columns["signal_emit"].item(0):
            return None
        return NOT_NOW

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        cols, n = lease.columns, lease.length
        emit = cols["signal_emit"]
        if n == 1:  # a live tick: one scalar read, most ticks change nothing
            if not emit[0]:
                return
            rows = [0]
        else:
            rows = np.flatnonzero(emit[:n]).tolist()
            if not rows:
                return
        ts, sym = cols["ts_ns"], cols["symbol_id"]
        side, strength = cols["signal_side"], cols["signal_strength"]
        target, reasons = cols["signal_target"], cols["signal_reasons"]
        topics_of = self._topics
        for row in rows:
            key = int(sym[row])
            named = topics_of.get(key)
            if named is None:
                symbol = ctx.symbol_name(key)
                named = (symbol, topics.event(self.topic_prefix, symbol))
                if ctx.symbols is not None and key < len(ctx.symbols):  # ids never change name
                    topics_of[key] = named
            signal = Signal(
                ts_ns=int(ts[row]),
                symbol=named[0],
                side=_SIDES[int(side[row])],
                strength=float(strength[row]),
                target_position=float(target[row]),
                reasons=reason_names(int(reasons[row])),
            )
            self.emitted += 1
            self.by_side[signal.side.value] += 1
            await ctx.publish(named[1], signal)

    def stats(self) -> dict[str, object]:
        return {"signals": self.emitted, "by_side": dict(self.by_side)}

    def snapshot_state(self) -> dict[str, object]:
        """Nothing: the emit-on-change state is the risk stage's (it applies the rule)."""
        return {}

    def restore_state(self, state: dict[str, object]) -> None:
        pass
