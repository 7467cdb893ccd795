"""Our topic grammar is NATS's subject grammar: a property test against a real server.

For generated topics and patterns (few token values, so that patterns often match), the
set of topics a NATS subscription on ``subject_pattern(pattern)`` receives equals the set
for which ``bus.topic_matches`` says yes. Also: what NATS cannot carry is refused by name.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

nats = pytest.importorskip("nats", reason="the NATS bridge needs the live extra (nats-py)")

from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402
from nautilus_pipeline.bridge.subjects import (  # noqa: E402
    MAX_TOKENS,
    SubjectError,
    name,
    subject,
    subject_pattern,
)
from nautilus_pipeline.bus import topic_matches, validate_pattern  # noqa: E402

TOKENS = st.sampled_from(["a", "b", "BTCUSDT-PERP", "x_1"])
TOPICS = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw) -> str:
    body = draw(st.lists(st.one_of(TOKENS, st.just("*")), min_size=0, max_size=4))
    tail = draw(st.sampled_from(["", ">", "**"]))
    parts = body + ([tail] if tail else [])
    if not parts:
        parts = ["*"]
    return ".".join(parts)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = NatsServer(tmp_path_factory.mktemp("nats-subjects")).start()
    yield srv
    srv.kill()


async def _nats_delivery(url: str, pats: list[str], topics: list[str]) -> list[set[str]]:
    """For each pattern, the topics a real NATS subscription received."""
    nc = await nats.connect(url)
    try:
        subs = [await nc.subscribe(subject_pattern(p)) for p in pats]
        done = await nc.subscribe("zz-sentinel")
        await nc.flush()
        for t in topics:
            await nc.publish(subject(t), b"")
        await nc.publish("zz-sentinel", b"")
        await done.next_msg(timeout=5)
        # one connection, one reader: everything published before the sentinel is queued now
        got = []
        for sub in subs:
            seen = set()
            while sub.pending_msgs:
                seen.add((await sub.next_msg(timeout=1)).subject)
            got.append(seen - {"zz-sentinel"})  # a pattern like '*' gets the sentinel too
        return got
    finally:
        await nc.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pats=st.lists(patterns(), min_size=1, max_size=6),
       topics=st.lists(TOPICS, min_size=1, max_size=12, unique=True))
def test_topic_matches_equals_nats_delivery(server, pats, topics):
    delivered = asyncio.run(_nats_delivery(server.url, pats, topics))
    for pattern, got in zip(pats, delivered, strict=True):
        parts = validate_pattern(pattern)
        ours = {t for t in topics if topic_matches(parts, t)}
        assert got == ours, pattern


@pytest.mark.parametrize(("bad", "why"), [
    ("signals.BTC USDT", "whitespace"),
    ("signals.BTC\tUSDT", "whitespace"),
    ("$SYS.x", "reserved"),
    ("a..b", "empty token"),
    (".a", "empty token"),
    (".".join(["t"] * (MAX_TOKENS + 1)), "at most 16"),
    ("signals.*", "wildcards"),
    ("signals.>", "wildcards"),
])
def test_a_topic_nats_cannot_carry_is_refused_saying_why(bad, why):
    with pytest.raises(SubjectError, match=why):
        subject(bad)


def test_double_star_is_written_as_nats_full_wildcard():
    assert subject_pattern("ticks.*.BINANCE.**") == "ticks.*.BINANCE.>"
    assert subject_pattern("signals.>") == "signals.>"
    with pytest.raises(SubjectError, match="last token"):
        subject_pattern("a.>.b")
    with pytest.raises(SubjectError, match="stands alone"):
        subject_pattern("a.b*")


def test_a_symbol_with_a_dot_cannot_make_a_tick_subject():
    from nautilus_pipeline import topics
    from nautilus_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be a topic segment"):
        topics.ticks("trades", "BINANCE", "BTC.USDT")


def test_stream_names_follow_nats_rules():
    assert name("TICKS") == "TICKS"
    for bad in ("TI.CKS", "a b", "a/b", "a*"):
        with pytest.raises(SubjectError, match="names cannot hold"):
            name(bad)
