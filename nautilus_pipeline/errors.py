"""One small error hierarchy rooted in :class:`PipelineError`.

Every message says what was wrong, where (file, line, stage, symbol, topic) and what
to do about it, so that a user reads the error and not a traceback from a parser.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(PipelineError):
    """A pipeline definition or an argument is invalid (names the file/key and what is allowed)."""


class DataError(PipelineError):
    """A tick file cannot be read, or a row breaks a check under the ``fail`` policy.

    ``file`` and ``line`` (the line, or record number of a binary file) say where, when one
    row is to blame; ``reason`` names the check it broke (``ts_backwards``, ``bad_price``...).
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.file = file
        self.line = line
        self.reason = reason


class BusClosedError(PipelineError):
    """Publishing or subscribing on a bus that is closed or closing."""


class HandlerError(PipelineError):
    """A handler raised under the ``fail_fast`` policy; ``__cause__`` is the original error.

    Context as attributes: ``subscription`` (its name), ``topic``, ``event`` (the event).
    """

    def __init__(self, message: str, *, subscription: str | None = None,
                 topic: str | None = None, event: object = None):
        super().__init__(message)
        self.subscription = subscription
        self.topic = topic
        self.event = event


class WouldBlockError(PipelineError):
    """``EventBus.publish_nowait`` found a ``block`` queue full (``await publish`` waits)."""


class RequestTimeoutError(PipelineError, TimeoutError):
    """``EventBus.request`` got no reply within its timeout."""


class NoResponderError(PipelineError, LookupError):
    """``EventBus.request`` was sent to a topic nobody answers."""


class PoolExhaustedError(PipelineError, TimeoutError):
    """``BufferPool.acquire`` timed out; the message names who holds the slabs."""


class LeaseError(PipelineError):
    """A lease was used after release, released twice, or leaked."""


class BackendUnavailableError(PipelineError):
    """No compute stream in a stage's preference list is usable on this machine."""


class StageError(PipelineError):
    """A stage failed on a batch. Context as attributes: ``stage``, ``topic``, ``batch`` (the
    lease's sequence number), ``rows``, ``stream``; ``__cause__`` is the original error."""

    def __init__(self, message: str, *, stage: str | None = None, topic: str | None = None,
                 batch: int | None = None, rows: int | None = None, stream: str | None = None):
        super().__init__(message)
        self.stage = stage
        self.topic = topic
        self.batch = batch
        self.rows = rows
        self.stream = stream
