"""Compute streams: one async interface over numpy, torch, MLX and Core ML."""

from .base import ComputeStream
from .cpu import CpuStream
from .registry import (
    STREAM_NAMES,
    BackendInfo,
    Selection,
    canonical,
    choose,
    create_stream,
    discover,
    runner_backend,
    unusable_reason,
    usable,
)

__all__ = [
    "STREAM_NAMES",
    "BackendInfo",
    "ComputeStream",
    "CpuStream",
    "Selection",
    "canonical",
    "choose",
    "create_stream",
    "discover",
    "runner_backend",
    "unusable_reason",
    "usable",
]
