"""Pipeline stages (orchestration around ``kernels/``), by the type names that definitions use.

A stage type is a :class:`~nautilus_pipeline.stage.Stage` subclass with a ``Params`` frozen
dataclass and a ``from_params`` classmethod; :mod:`nautilus_pipeline.params` derives the
TOML keys from ``Params``. ``STAGE_TYPES`` maps the built-in type names to their classes; a
user's stage is named by import path instead (``type = "mypkg.stages:MyStage"``).
"""

from __future__ import annotations

from .book import BookStage, BookStageParams
from .features import FeaturesParams, FeaturesStage
from .inference import InferenceParams, InferenceStage
from .portfolio import PortfolioParams, PortfolioStage
from .recorder import RecorderStage
from .risk import RiskStage, RiskStageParams
from .signal import SignalStage
from .vpin import VpinStage, VpinStageParams

STAGE_TYPES: dict[str, type] = {
    "book": BookStage,
    "features": FeaturesStage,
    "inference": InferenceStage,
    "vpin": VpinStage,
    "risk": RiskStage,
    "signal": SignalStage,
    "portfolio": PortfolioStage,
}
"""Built-in stage types of pipeline definitions, in the order of the default chain."""

__all__ = [
    "STAGE_TYPES",
    "BookStage",
    "BookStageParams",
    "FeaturesParams",
    "FeaturesStage",
    "InferenceParams",
    "InferenceStage",
    "PortfolioParams",
    "PortfolioStage",
    "RecorderStage",
    "RiskStage",
    "RiskStageParams",
    "SignalStage",
    "VpinStage",
    "VpinStageParams",
]
