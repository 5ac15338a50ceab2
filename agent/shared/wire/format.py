"""The batch format between agent and collector, version 1.

A batch is one msgpack map (string keys), sent as the body of
``POST /api/v1/batches`` with ``Content-Type: application/msgpack``::

    {
      "v": 1,                      # wire version (int)
      "batch_id": "<32 hex>",      # chosen by the agent; a resend reuses it
      "epoch": "<32 hex>",         # the agent's state database; new after a reset
      "seq": 7,                    # 1, 2, 3 ... per epoch; a resend reuses it
      "agent_id": "<id>",          # must equal the identity of the API key
      "host_name": "web-01",
      "sent_at": 1790000000000,    # ms since the epoch, agent clock
      "events": [ <event>, ... ],  # full detail, while a pair is locally rare
      "counts": [ <count>, ... ],  # timestamps only, once it is not
      "gaps":   [ <gap>, ... ],    # what the agent knows it lost
      "notes":  [ <note>, ... ],   # optional: enrichment that came after its event
    }

``<event>`` is a map: ``ts`` (int ms), ``action`` ("creation" | "rename"),
``exe`` and ``path`` (bin or nil: file names are bytes), and optional detail:
``etype`` ([str]), ``orig`` (bin, a rename's source), ``pid``, ``ppid``
(int), ``pname``, ``cmd``, ``uid``, ``uname``, ``attr``, ``ppname`` (str),
``ppexe`` (bin), ``file`` (map: ``size``, ``mode``, ``uid``, ``gid`` int,
``sha256`` str, ``sample`` bin, ``gone`` bool); for a writer in a container
(``path`` and ``exe`` then the container's), ``ctr`` (map: ``id``, ``rt``,
``name``, ``image`` str), ``vpid`` (int, the pid inside) and ``hpath`` (bin,
where the host sees the file); ``ctx`` (map, the enrichment: package, web
root, content signals, requests; :mod:`agent.shared.wire.context`, with
``<note>``). A collector ignores detail it does not know.

``<count>`` is ``[exe, path, [t0, d1, d2, ...]]``: the pair's event times,
sorted, the first absolute and each next one a non-negative delta in ms.
Each time is one event, exactly like an ``<event>`` without detail; a pair
whose count in the agent's own hour reaches the rule's threshold goes on as
counts, so ``cc`` and ``agent_count`` stay exact for any evaluation time.

``"actors"`` (optional, same length as ``counts``): for each count, nil or
``[pname, uname, uid]`` (str or nil each), the process name and user that
wrote those times, so the collector can apply an exception on them to bare
times too. An agent groups a pair's times by actor; a collector that does not
know the field ignores it and counts the times the same.

``<gap>`` is a map: ``start``, ``end`` (ms), ``lost`` (int, 0 = unknown)
and ``reason`` (str: "overflow", "outbox_full", "disk_full", ...).

Several rules (optional batch fields, all or none of the first three):
``"rules"`` ([str], at most MAX_RULE_BITS rule ids), ``"erules"`` (one int
per event) and ``"crules"`` (one int per count): bit i set when the record
matched ``rules[i]``. The agent keeps what any of its rules could match, so a
collector counts for each rule only the records of that rule. A batch without
``rules`` is an older agent's: every record is the first rule's (it kept no
other). ``"host_id"`` (str, optional): the machine id, ECS ``host.id``
(absent: the collector uses the agent id). ``file.extension`` is not sent: it
is a function of the path (:func:`agent.shared.exceptions.file_extension`),
so agent and collector cannot disagree on it.

Compatibility rule. ``v`` is a major version. Within one version, fields may
be added to ``<event>``, ``<gap>`` and the batch map, and readers ignore
fields they do not know; a field is never removed or given a new meaning
without a new ``v``. A collector accepts every version in
``SUPPORTED_VERSIONS`` (the current one and the one before it) and answers
any other with 400 and the list; an agent speaks ``VERSION`` only.
Idempotency: ``(agent_id, epoch, seq)`` names a batch; the contents of a
batch never change once it has a seq, so a resend is a duplicate by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import msgpack

from agent.shared.events import Actor

VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Hard limits. The unpacker gets them explicitly so a length claim cannot
# allocate (msgpack < 1.2.4 preallocates from the header).
MAX_BODY = 8 << 20  # bytes of one batch
MAX_RECORDS = 20_000  # events + count times + gaps in one batch
# Objects the decoder builds for one body, every map key and value and array
# item counted: a batch of MAX_RECORDS events with full detail and facts has
# about 1,000,000; the bound keeps a hostile body under ~80 MB of objects.
MAX_OBJECTS = 1_200_000
MAX_BIN = 16 << 10  # a path (PATH_MAX is 4096) or a file sample
MAX_STR = 16 << 10  # a command line is capped by the agent before this
MAX_CTR = 256  # a container's id, runtime, name or image (the agent cuts them here)
MAX_ID = 128
MAX_TS = (1 << 53) - 1
MAX_RULE_BITS = 32
ACTIONS = ("creation", "rename")
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}\Z")


@dataclass(frozen=True)
class EventRecord:
    ts: int
    action: str
    exe: Optional[bytes]
    path: Optional[bytes]
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CountRecord:
    exe: Optional[bytes]
    path: Optional[bytes]
    times: tuple[int, ...]
    actor: Optional[Actor] = None


@dataclass(frozen=True)
class GapRecord:
    start: int
    end: int
    lost: int
    reason: str


@dataclass(frozen=True)
class Batch:
    batch_id: str
    epoch: str
    seq: int
    agent_id: str
    host_name: str
    sent_at: int
    events: tuple[EventRecord, ...] = ()
    counts: tuple[CountRecord, ...] = ()
    gaps: tuple[GapRecord, ...] = ()
    version: int = VERSION
    rules: tuple[str, ...] = ()  # () : an older agent's, every record the first rule's
    event_rules: tuple[int, ...] = ()
    count_rules: tuple[int, ...] = ()
    host_id: str = ""
    notes: tuple[tuple[int, Optional[bytes], Optional[bytes], str, bytes], ...] = ()  # as RowBatch

    def size(self) -> int:
        """Records in the batch, each count time counting as one."""
        return len(self.events) + sum(len(c.times) for c in self.counts) + len(self.gaps)


def valid_agent_id(value: str) -> bool:
    return bool(_ID.match(value))


@dataclass(frozen=True)
class RowBatch:
    """A validated batch in the collector's storage form (what
    :func:`decode_rows` returns, small to pickle between processes).

    ``events``: ``(ts, key, exe, path, detail, actor)``, ``detail`` already
    msgpack of ``{"action": ..., **detail}``; ``counts``: ``(key, exe, path,
    times, actor)``; ``key`` is :func:`pair_key` of (exe, path), ``actor``
    :func:`actor_key` of who wrote it (None when nothing is known)."""

    batch_id: str
    epoch: str
    seq: int
    agent_id: str
    host_name: str
    sent_at: int
    events: tuple[tuple[int, bytes, Optional[bytes], Optional[bytes], bytes, Optional[bytes]], ...] = ()
    counts: tuple[tuple[bytes, Optional[bytes], Optional[bytes], tuple[int, ...], Optional[bytes]], ...] = ()
    gaps: tuple[GapRecord, ...] = ()
    version: int = VERSION
    rules: tuple[str, ...] = ()  # as Batch
    event_rules: tuple[int, ...] = ()
    count_rules: tuple[int, ...] = ()
    host_id: str = ""
    # (event ts, exe, path, kind, msgpack body): see agent.shared.wire.context
    notes: tuple[tuple[int, Optional[bytes], Optional[bytes], str, bytes], ...] = ()

    def events_total(self) -> int:
        """Events in the batch, each count time counting as one."""
        return len(self.events) + sum(len(c[3]) for c in self.counts)

    def size(self) -> int:
        """Records in the batch, each count time counting as one (as :meth:`Batch.size`)."""
        return self.events_total() + len(self.gaps)

    def times(self) -> list[int]:
        return [e[0] for e in self.events] + [t for c in self.counts for t in c[3]]


def actor_key(actor: Optional[Actor]) -> Optional[bytes]:
    """The collector's key of an actor: msgpack of ``[pname, uname, uid]``,
    None when none of them is known."""
    if actor is None or actor == (None, None, None):
        return None
    return bytes(msgpack.packb(list(actor), use_bin_type=True))


def pair_key(exe: Optional[bytes], path: Optional[bytes]) -> bytes:
    """The collector's key of a pair: msgpack of ``[exe, path]`` (nil works)."""
    return bytes(msgpack.packb([exe, path], use_bin_type=True))


MAX_CMD = 4096  # a command line is cut here (with a marker) before it is stored
