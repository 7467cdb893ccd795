"""Tick data in: readers per format, checks and accounting of bad input, and the replay.

Public API (see each module's docstring for the why and the units)::

    Replay(sources, speed=None, clock=None)      # replay.py: merge, pace, fill pool slabs
    Source(path, format=None, symbol=None, policy="fail", quarantine=None, ...)
    detect_format(path) / open_reader(path, format=None, **options)
    TickChunk, TickReader                        # what readers yield / their interface
    Accounting, Policy, Validator                # checks.py
    FieldMap                                     # column mapping for CSV / Parquet / JSON lines
"""

from .checks import Accounting, Counts, Policy, Validator
from .chunk import BadRow, Reason, TickChunk, TickReader
from .formats import READERS, Source, detect_format, open_reader
from .replay import ManualClock, MonotonicClock, Progress, Replay, SymbolTable
from .table import FieldMap

__all__ = [
    "READERS",
    "Accounting",
    "BadRow",
    "Counts",
    "FieldMap",
    "ManualClock",
    "MonotonicClock",
    "Policy",
    "Progress",
    "Reason",
    "Replay",
    "Source",
    "SymbolTable",
    "TickChunk",
    "TickReader",
    "Validator",
    "detect_format",
    "open_reader",
]
