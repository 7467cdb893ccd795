"""Signal stage: the sink. Model probability + toxic flow + kill switch → ``Signal`` events.

Applies the rule of ``kernels.signal`` per trade row with the toxicity flag and the kill
switch *as of that row* (written by the VPIN and risk stages), publishes a
:class:`~nautilus_pipeline.events.Signal` on ``signals.<symbol>`` whenever a symbol's
(side, target) changes, and writes ``signal_side``/``signal_target`` into the slab. It is
the last stage: when it returns, the bus releases the batch back to the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import topics
from ..compute import ComputeStream
from ..errors import ConfigError
from ..events import KIND_TRADE, ColumnSpec, Side, Signal
from ..kernels.rows import symbol_groups
from ..kernels.signal import (
    SignalParams,
    SignalState,
    new_signal_state,
    reason_names,
    signal_update,
)
from ..memory import Lease
from ..stage import Stage, StageContext

_SIDES = {1: Side.BUY, -1: Side.SELL, 0: Side.FLAT}


class SignalStage(Stage):
    """Reads ``prediction``, ``toxic``, ``kill``; writes ``signal_side`` and ``signal_target``."""

    reads = ("ts_ns", "symbol_id", "kind", "prediction", "toxic", "kill")
    writes = (
        ColumnSpec("signal_side", np.dtype(np.int8)),
        ColumnSpec("signal_target", np.dtype(np.float64), fill=np.nan),
    )

    Params = SignalParams

    @classmethod
    def from_params(cls, p: SignalParams, ctx: Any, *, name: str, streams: Sequence[str]) -> SignalStage:
        return cls(p, name=name, streams=streams)

    def __init__(
        self,
        rule: SignalParams | None = None,
        *,
        name: str = "signal",
        streams: Sequence[str] = ("cpu",),
        topic_prefix: str = topics.SIGNALS,
    ):
        self.name = name
        self.streams = tuple(streams)
        self.rule = rule or SignalParams()
        self.topic_prefix = topic_prefix

    def connect(self, upstream: Sequence[Stage]) -> None:
        from .risk import RiskStage  # risk imports the signal kernel: import late

        for stage in upstream:
            if isinstance(stage, RiskStage) and stage.rule != self.rule:
                raise ConfigError(
                    f"signal stage {self.name!r} and risk stage {stage.name!r} must use the "
                    f"same rule (the risk stage simulates the signals): {self.rule} vs {stage.rule}"
                )

    async def start(self, ctx: StageContext) -> None:
        self.states: dict[int, SignalState] = {}
        self.emitted = 0
        self.by_side = {s.value: 0 for s in Side}

    def _compute(self, lease: Lease):
        sym, kind = lease["symbol_id"], lease["kind"]
        n = sym.shape[0]
        side = np.zeros(n, dtype=np.int8)
        target = np.full(n, np.nan)
        states = dict(self.states)
        emits = []
        for key, rows in symbol_groups(sym):
            trade_rows = rows[kind[rows] == KIND_TRADE]
            if not trade_rows.size:
                continue
            st = states.get(key) or new_signal_state(self.rule)
            st, out = signal_update(
                st,
                lease["prediction"][trade_rows],
                lease["toxic"][trade_rows].astype(bool),
                lease["kill"][trade_rows].astype(bool),
            )
            states[key] = st
            side[trade_rows] = out["side"]
            target[trade_rows] = out["target"]
            for i in np.flatnonzero(out["emit"]):
                emits.append((int(trade_rows[i]), key, int(out["side"][i]),
                              float(out["strength"][i]), float(out["target"][i]),
                              int(out["reasons"][i])))
        emits.sort()
        return states, side, target, emits

    async def process(self, lease: Lease, stream: ComputeStream, ctx: StageContext) -> None:
        states, side, target, emits = await stream.run(self._compute, lease)
        lease["signal_side"][...] = side
        lease["signal_target"][...] = target
        self.states = states
        ts = lease["ts_ns"]
        for row, key, s, strength, tgt, reasons in emits:
            symbol = ctx.symbol_name(key)
            signal = Signal(
                ts_ns=int(ts[row]),
                symbol=symbol,
                side=_SIDES[s],
                strength=strength,
                target_position=tgt,
                reasons=reason_names(reasons),
            )
            self.emitted += 1
            self.by_side[signal.side.value] += 1
            await ctx.publish(topics.event(self.topic_prefix, symbol), signal)

    def stats(self) -> dict[str, object]:
        return {"signals": self.emitted, "by_side": dict(self.by_side)}

    def snapshot_params(self) -> dict[str, object]:
        return {"rule": self.rule}

    def snapshot_state(self) -> dict[str, object]:
        """Each symbol's last probability and (side, target): what decides the next emit."""
        return {"states": dict(self.states)}

    def restore_state(self, state: dict[str, object]) -> None:
        self.states = dict(state["states"])
