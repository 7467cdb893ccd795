"""Signal rule: model probability, toxic flow and the risk kill switch → side, strength, target.

Per row, in this order of precedence:

1. kill switch on → FLAT, reason ``risk_kill_switch``;
2. toxic flow and ``step_aside_on_toxic`` → FLAT, reason ``toxic_flow``;
3. ``prob ≥ long_threshold`` → BUY, reason ``model_long``; ``prob ≤ short_threshold`` →
   SELL, ``model_short``; otherwise FLAT, ``model_neutral``.

``prob`` is the model's probability that the price goes up (in [0, 1]); a NaN ``prob`` (no
model output on this row, e.g. a quote row) repeats the symbol's last probability, and
before any, counts as neutral with reason ``no_model``. Strength is ``|2·prob − 1|`` for
BUY/SELL and 0 for FLAT. Target position (base units): ``side · max_position`` with
``sizing = "fixed"``, or ``side · strength · max_position`` with ``"proportional"``.
``emit`` marks the rows whose (side, target) differ from the previous row's, the first
row of a symbol included: the stage publishes a :class:`~nautilus_pipeline.events.Signal`
only there (emit on change). The rule has no other memory, so it is vectorised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from nautilus_pipeline.errors import ConfigError

__all__ = [
    "REASON_KILL_SWITCH",
    "REASON_MODEL_LONG",
    "REASON_MODEL_NEUTRAL",
    "REASON_MODEL_SHORT",
    "REASON_NAMES",
    "REASON_NO_MODEL",
    "REASON_TOXIC_FLOW",
    "SignalParams",
    "SignalState",
    "new_signal_state",
    "reason_names",
    "signal_update",
]

REASON_MODEL_LONG = 1
REASON_MODEL_SHORT = 2
REASON_MODEL_NEUTRAL = 4
REASON_TOXIC_FLOW = 8
REASON_KILL_SWITCH = 16
REASON_NO_MODEL = 32
REASON_NAMES: dict[int, str] = {
    REASON_MODEL_LONG: "model_long",
    REASON_MODEL_SHORT: "model_short",
    REASON_MODEL_NEUTRAL: "model_neutral",
    REASON_TOXIC_FLOW: "toxic_flow",
    REASON_KILL_SWITCH: "risk_kill_switch",
    REASON_NO_MODEL: "no_model",
}


def reason_names(mask: int) -> tuple[str, ...]:
    """The reason names in a ``reasons`` bit mask, in a fixed order."""
    return tuple(name for bit, name in REASON_NAMES.items() if mask & bit)


@dataclass(frozen=True, slots=True)
class SignalParams:
    """Thresholds on the model probability, stepping aside on toxic flow, sizing."""

    long_threshold: float = 0.55
    short_threshold: float = 0.45
    max_position: float = 1.0
    sizing: str = "fixed"
    step_aside_on_toxic: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.short_threshold < self.long_threshold <= 1.0:
            raise ConfigError(
                f"signal: need 0 <= short_threshold < long_threshold <= 1, got "
                f"{self.short_threshold}, {self.long_threshold}"
            )
        if self.sizing not in ("fixed", "proportional"):
            raise ConfigError(
                f"signal: sizing must be 'fixed' or 'proportional', got {self.sizing!r}"
            )
        if not self.max_position >= 0:
            raise ConfigError(f"signal: max_position must be >= 0, got {self.max_position}")


@dataclass(frozen=True, slots=True)
class SignalState:
    """The last probability seen and the last (side, target), for NaN rows and emit-on-change."""

    params: SignalParams
    last_prob: float = math.nan
    last_side: int = 0
    last_target: float = math.nan


def new_signal_state(params: SignalParams | None = None) -> SignalState:
    """A symbol with no signal yet: its first row always emits."""
    return SignalState(params or SignalParams())


def signal_update(
    state: SignalState, prob: np.ndarray, toxic: np.ndarray, kill: np.ndarray
) -> tuple[SignalState, dict[str, np.ndarray]]:
    """Apply the rule to one symbol's rows; returns the new state and per-row arrays.

    Inputs per row: ``prob`` float64 (NaN: no model output), ``toxic`` and ``kill`` bool
    (the latest VPIN flag and kill switch as of the row). Output: ``side`` int8 (+1/−1/0),
    ``strength`` float64 in [0, 1], ``target`` float64 base units, ``reasons`` int64 bit
    mask (:func:`reason_names`), ``emit`` bool.
    """
    prm = state.params
    pr = np.asarray(prob, dtype=np.float64)
    tox = np.asarray(toxic, dtype=bool)
    kl = np.asarray(kill, dtype=bool)
    n = pr.shape[0]
    # forward-fill NaN probabilities from the last known one
    idx = np.where(np.isnan(pr), -1, np.arange(n))
    np.maximum.accumulate(idx, out=idx)
    filled = np.concatenate(([state.last_prob], pr))[idx + 1]
    no_model = np.isnan(filled)

    side = np.zeros(n, dtype=np.int8)
    reasons = np.zeros(n, dtype=np.int64)
    is_long = filled >= prm.long_threshold
    is_short = filled <= prm.short_threshold
    side[is_long] = 1
    side[is_short] = -1
    reasons[is_long] = REASON_MODEL_LONG
    reasons[is_short] = REASON_MODEL_SHORT
    reasons[~(is_long | is_short)] = REASON_MODEL_NEUTRAL
    reasons[no_model] = REASON_NO_MODEL
    strength = np.where(side != 0, np.abs(2.0 * filled - 1.0), 0.0)
    if prm.step_aside_on_toxic:
        reasons[tox] |= REASON_TOXIC_FLOW
        side[tox] = 0
    reasons[kl] |= REASON_KILL_SWITCH
    side[kl] = 0
    strength[side == 0] = 0.0
    if prm.sizing == "fixed":
        target = side * prm.max_position
    else:
        target = side * strength * prm.max_position
    target = target.astype(np.float64) + 0.0  # no −0.0 targets

    prev_side = np.concatenate(([state.last_side], side[:-1]))
    prev_target = np.concatenate(([state.last_target], target[:-1]))
    emit = (side != prev_side) | (target != prev_target)
    new = state
    if n:
        new = replace(
            state,
            last_prob=float(filled[-1]),
            last_side=int(side[-1]),
            last_target=float(target[-1]),
        )
    return new, {
        "side": side,
        "strength": strength,
        "target": target,
        "reasons": reasons,
        "emit": emit,
    }
