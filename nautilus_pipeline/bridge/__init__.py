"""Live across processes and hosts: a pipeline fed from, and exporting to, NATS JetStream.

One module per concept: ``subjects`` (topics ↔ subjects, what NATS cannot carry), ``wire``
(batches as raw column buffers, events as orjson), ``publisher`` (tick batches into the
ticks stream), ``ingress`` (durable pull consumer → ``Pipeline``), ``egress`` (bus topics →
a stream, de-duplicated), ``state`` (snapshots in a KV bucket), ``nats_bridge``
(:class:`NatsBridge`, the async context manager tying them together) and ``server`` (a
local ``nats-server`` for tests and benchmarks). Needs the ``live`` extra (``nats-py``).
"""

from .egress import EgressError
from .nats_bridge import EVENTS_STREAM, STATE_BUCKET, NatsBridge
from .publisher import TICKS_STREAM, TickPublisher, ensure_stream
from .state import SavedState, StateError
from .subjects import SubjectError, subject, subject_pattern
from .wire import WireError, decode_batch, decode_event, encode_batch, encode_event

__all__ = [
    "EVENTS_STREAM", "STATE_BUCKET", "TICKS_STREAM", "EgressError", "NatsBridge", "SavedState",
    "StateError", "SubjectError", "TickPublisher", "WireError", "decode_batch", "decode_event",
    "encode_batch", "encode_event", "ensure_stream", "subject", "subject_pattern",
]
