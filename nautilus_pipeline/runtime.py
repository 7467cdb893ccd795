"""Running the event loop (uvloop where available) and configuring structured logs.

uvloop is a drop-in, faster implementation of the asyncio loop (``scripts/bench_bus.py``
measures the bus under both); where it is missing (Windows, or not installed) the
standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import orjson
import structlog

T = TypeVar("T")


def loop_factory(use_uvloop: bool = True):
    """uvloop's loop factory when asked for and installed, else None (the default loop)."""
    if use_uvloop:
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:
            pass
    return None


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True, debug: bool = False) -> T:
    """``asyncio.run`` on uvloop where available, on the standard loop otherwise."""
    factory = loop_factory(use_uvloop)
    with asyncio.Runner(loop_factory=factory, debug=debug) as runner:
        return runner.run(main)


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of each write.

    Binding a logger to the stderr object of the moment breaks as soon as someone swaps
    it (pytest's capture, a daemon closing fds): the next log line raises on a closed file.
    """

    def __init__(self, binary: bool):
        self.binary = binary

    def write(self, data):
        err = sys.stderr
        if self.binary:
            buf = getattr(err, "buffer", None)
            if buf is not None:
                return buf.write(data)
            return err.write(data.decode("utf-8", "replace"))
        return err.write(data)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: str = "auto", level: str = "info", stream=None) -> None:
    """Logs through structlog to stderr: JSON lines (orjson) when not on a terminal, console
    otherwise. Call it once in an application that embeds the pipeline; without it
    structlog's defaults print everything, debug included, to stdout."""
    if fmt == "auto":
        fmt = "console" if (stream or sys.stderr).isatty() else "json"
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors = [
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory = structlog.BytesLoggerFactory(
            file=getattr(stream, "buffer", stream) if stream is not None else _CurrentStderr(True)
        )
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer()]
        factory = structlog.PrintLoggerFactory(file=stream if stream is not None else _CurrentStderr(False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
