"""Our topics as NATS subjects, one to one, and what NATS cannot carry.

The grammars agree: dot-separated tokens, ``*`` one token, ``>`` the rest (one or more
tokens). Our ``**`` is a synonym of ``>`` and is written ``>`` on the wire; nothing else is
rewritten, so a subject read back from NATS is the topic that was published (no escaping
scheme to get wrong). What NATS cannot carry is refused with a :class:`SubjectError` saying
which topic, which token and why:

- whitespace anywhere (NATS splits protocol lines on it);
- an empty token (``a..b``, a leading or trailing dot);
- a first token starting with ``$`` (``$JS``, ``$KV``, ``$SYS``: the server's own subjects);
- more than :data:`MAX_TOKENS` tokens (the limit we keep for subjects and stream filters);
- a wildcard inside a token (``BTC*``) or ``>`` before the last token.

A symbol holding a ``.`` would add a token, so a tick subject's symbol is checked as one
segment (``topics.segment``), as every topic we build is. The equivalence of our
``topic_matches`` and NATS delivery is a property test against a real server
(``tests/test_bridge_subjects.py``).

Stream and consumer names are NATS names, not subjects: no ``.``, ``*``, ``>``, whitespace
or path separators (they become directories in the store).
"""

from __future__ import annotations

from ..errors import ConfigError

MAX_TOKENS = 16
_WHITESPACE = frozenset(" \t\r\n\f\v\x00")
_BAD_NAME = frozenset(" \t\r\n\f\v\x00.*>/\\")


class SubjectError(ConfigError):
    """A topic, pattern or name that NATS cannot carry (says which and why)."""


def _tokens(text: str, what: str) -> list[str]:
    if not isinstance(text, str) or not text:
        raise SubjectError(f"{what} {text!r}: must be a non-empty string")
    bad = sorted({c for c in text if c in _WHITESPACE})
    if bad:
        raise SubjectError(f"{what} {text!r}: NATS subjects cannot hold whitespace ({bad!r})")
    tokens = text.split(".")
    if any(not t for t in tokens):
        raise SubjectError(f"{what} {text!r}: empty token (leading, trailing or doubled '.')")
    if tokens[0].startswith("$"):
        raise SubjectError(f"{what} {text!r}: a first token starting with '$' is reserved by "
                           "the NATS server ($JS, $KV, $SYS)")
    if len(tokens) > MAX_TOKENS:
        raise SubjectError(f"{what} {text!r}: {len(tokens)} tokens, at most {MAX_TOKENS}")
    return tokens


def subject(topic: str) -> str:
    """The subject a published ``topic`` travels on (the topic itself, once checked)."""
    for token in _tokens(topic, "topic"):
        if "*" in token or ">" in token:
            raise SubjectError(f"topic {topic!r}: wildcards ('*', '>') are for patterns, not "
                               "published topics")
    return topic


def subject_pattern(pattern: str) -> str:
    """The NATS subject filter for one of our subscription patterns (``**`` → ``>``)."""
    tokens = _tokens(pattern, "pattern")
    out = []
    for i, token in enumerate(tokens):
        if token in (">", "**"):
            if i != len(tokens) - 1:
                raise SubjectError(f"pattern {pattern!r}: {token!r} must be the last token")
            out.append(">")
        elif token == "*":
            out.append("*")
        elif "*" in token or ">" in token:
            raise SubjectError(f"pattern {pattern!r}: a wildcard stands alone as a token, "
                               f"not inside {token!r}")
        else:
            out.append(token)
    return ".".join(out)


def name(text: str, what: str = "stream") -> str:
    """A stream, consumer or bucket name, checked against NATS's rules for names."""
    if not isinstance(text, str) or not text:
        raise SubjectError(f"{what} name {text!r}: must be a non-empty string")
    bad = sorted({c for c in text if c in _BAD_NAME})
    if bad:
        raise SubjectError(f"{what} name {text!r}: NATS names cannot hold {bad!r}")
    return text
