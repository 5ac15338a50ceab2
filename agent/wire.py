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
    }

``<event>`` is a map: ``ts`` (int ms), ``action`` ("creation" | "rename"),
``exe`` and ``path`` (bin or nil: file names are bytes), and optional detail:
``etype`` ([str]), ``orig`` (bin, a rename's source), ``pid``, ``ppid``
(int), ``pname``, ``cmd``, ``uid``, ``uname``, ``attr``, ``ppname`` (str),
``ppexe`` (bin), ``file`` (map: ``size``, ``mode``, ``uid``, ``gid`` int,
``sha256`` str, ``sample`` bin, ``gone`` bool).

``<count>`` is ``[exe, path, [t0, d1, d2, ...]]``: the pair's event times,
sorted, the first absolute and each next one a non-negative delta in ms.
Each time is one event, exactly like an ``<event>`` without detail; a pair
whose count in the agent's own hour reaches the rule's threshold goes on as
counts, so ``cc`` and ``agent_count`` stay exact for any evaluation time.

``<gap>`` is a map: ``start``, ``end`` (ms), ``lost`` (int, 0 = unknown)
and ``reason`` (str: "overflow", "outbox_full", "disk_full", ...).

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
from itertools import accumulate
from typing import Any, Optional

import msgpack

from agent.errors import VersionError, WireError

VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Hard limits. The unpacker gets them explicitly so a length claim cannot
# allocate (msgpack < 1.2.4 preallocates from the header).
MAX_BODY = 8 << 20  # bytes of one batch
MAX_RECORDS = 20_000  # events + count times + gaps in one batch
MAX_BIN = 16 << 10  # a path (PATH_MAX is 4096) or a file sample
MAX_STR = 16 << 10  # a command line is capped by the agent before this
MAX_ID = 128
MAX_TS = (1 << 53) - 1
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

    def size(self) -> int:
        """Records in the batch, each count time counting as one."""
        return len(self.events) + sum(len(c.times) for c in self.counts) + len(self.gaps)


def valid_agent_id(value: str) -> bool:
    return bool(_ID.match(value))


# ---------------------------------------------------------------- encoding


def encode_event(rec: EventRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"ts": rec.ts, "action": rec.action, "exe": rec.exe, "path": rec.path}
    out.update(rec.detail)
    return out


def encode_times(times: list[int]) -> list[int]:
    times = sorted(times)
    return [times[0]] + [b - a for a, b in zip(times, times[1:])] if times else []


def encode_batch(batch: Batch) -> bytes:
    doc = {
        "v": batch.version,
        "batch_id": batch.batch_id,
        "epoch": batch.epoch,
        "seq": batch.seq,
        "agent_id": batch.agent_id,
        "host_name": batch.host_name,
        "sent_at": batch.sent_at,
        "events": [encode_event(e) for e in batch.events],
        "counts": [[c.exe, c.path, encode_times(list(c.times))] for c in batch.counts],
        "gaps": [{"start": g.start, "end": g.end, "lost": g.lost, "reason": g.reason} for g in batch.gaps],
    }
    return bytes(msgpack.packb(doc, use_bin_type=True))


# ---------------------------------------------------------------- decoding


def _no_ext(code: int, data: bytes) -> Any:
    raise WireError(f"ext type {code} is not allowed")


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    # Fast path in C: dict() and str.join reject nothing a valid map has; a
    # map they do not pass (a duplicate or a non-string key) is examined
    # again key by key, so the error names the first bad key as before.
    try:
        out = dict(pairs)
        if len(out) == len(pairs):
            "".join(out)
            return out
    except TypeError:
        pass
    out = {}
    for k, v in pairs:
        if not isinstance(k, str):
            raise WireError("map keys must be strings")
        if k in out:
            raise WireError(f"duplicate map key {k!r}")
        out[k] = v
    return out


def unpack(body: bytes) -> Any:
    """msgpack bytes to Python objects, with every limit explicit.

    Raises WireError for anything that is not one well-formed, bounded
    msgpack object: truncation, trailing bytes, reserved bytes, ext types,
    non-string or duplicate map keys, excessive nesting or lengths.
    """
    if len(body) > MAX_BODY:
        raise WireError(f"body of {len(body)} bytes exceeds {MAX_BODY}")
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_pairs,
            ext_hook=_no_ext,
            max_str_len=MAX_STR,
            max_bin_len=MAX_BIN,
            max_array_len=MAX_RECORDS,
            max_map_len=64,
            max_ext_len=0,
        )
    except WireError:
        raise
    except msgpack.ExtraData:
        raise WireError("trailing bytes after the batch") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        # StackError, FormatError, OutOfData and UnicodeDecodeError all land here.
        raise WireError(f"not well-formed msgpack ({type(e).__name__})") from None


def _int(v: Any, path: str, lo: int = 0, hi: int = MAX_TS) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise WireError(f"must be an integer, got {type(v).__name__}", path)
    if not lo <= v <= hi:
        raise WireError(f"must be in [{lo}, {hi}], got {v}", path)
    return v


def _str(v: Any, path: str, limit: int = MAX_STR, empty: bool = True) -> str:
    if not isinstance(v, str):
        raise WireError(f"must be a string, got {type(v).__name__}", path)
    if len(v) > limit or (not empty and not v):
        raise WireError(f"length {len(v)} outside [{0 if empty else 1}, {limit}]", path)
    return v


def _bin(v: Any, path: str, nil: bool = True) -> Optional[bytes]:
    if v is None and nil:
        return None
    if not isinstance(v, bytes):
        raise WireError(f"must be bin{' or nil' if nil else ''}, got {type(v).__name__}", path)
    if not v:
        raise WireError("must not be empty", path)
    return v


def _list(v: Any, path: str) -> list[Any]:
    if not isinstance(v, list):
        raise WireError(f"must be an array, got {type(v).__name__}", path)
    return v


def _map(v: Any, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise WireError(f"must be a map, got {type(v).__name__}", path)
    return v


_DETAIL_INT = ("pid", "ppid")
_DETAIL_STR = ("pname", "cmd", "uid", "uname", "attr", "ppname")
_DETAIL_BIN = ("orig", "ppexe")
_FILE_INT = ("size", "mode", "uid", "gid")


def _detail(e: dict[str, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in _DETAIL_INT:
        if e.get(k) is not None:
            out[k] = _int(e[k], f"{path}.{k}", 0, (1 << 31) - 1)
    for k in _DETAIL_STR:
        if e.get(k) is not None:
            out[k] = _str(e[k], f"{path}.{k}")
    for k in _DETAIL_BIN:
        if e.get(k) is not None:
            out[k] = _bin(e[k], f"{path}.{k}")
    if e.get("etype") is not None:
        out["etype"] = [_str(t, f"{path}.etype[{i}]", 32) for i, t in enumerate(_list(e["etype"], path))]
    if e.get("file") is not None:
        f = _map(e["file"], f"{path}.file")
        facts: dict[str, Any] = {}
        for k in _FILE_INT:
            if f.get(k) is not None:
                facts[k] = _int(f[k], f"{path}.file.{k}", 0, MAX_TS)
        if f.get("sha256") is not None:
            facts["sha256"] = _str(f["sha256"], f"{path}.file.sha256", 64)
        if f.get("sample") is not None:
            facts["sample"] = _bin(f["sample"], f"{path}.file.sample")
        if f.get("gone") is not None:
            if not isinstance(f["gone"], bool):
                raise WireError("must be a boolean", f"{path}.file.gone")
            facts["gone"] = f["gone"]
        out["file"] = facts
    return out


@dataclass(frozen=True)
class RowBatch:
    """A validated batch in the collector's storage form (what
    :func:`decode_rows` returns, small to pickle between processes).

    ``events``: ``(ts, key, exe, path, detail)``, ``detail`` already msgpack of
    ``{"action": ..., **detail}``; ``counts``: ``(key, exe, path, times)``;
    ``key`` is :func:`pair_key` of (exe, path)."""

    batch_id: str
    epoch: str
    seq: int
    agent_id: str
    host_name: str
    sent_at: int
    events: tuple[tuple[int, bytes, Optional[bytes], Optional[bytes], bytes], ...] = ()
    counts: tuple[tuple[bytes, Optional[bytes], Optional[bytes], tuple[int, ...]], ...] = ()
    gaps: tuple[GapRecord, ...] = ()
    version: int = VERSION

    def events_total(self) -> int:
        """Events in the batch, each count time counting as one."""
        return len(self.events) + sum(len(c[3]) for c in self.counts)

    def size(self) -> int:
        """Records in the batch, each count time counting as one (as :meth:`Batch.size`)."""
        return self.events_total() + len(self.gaps)

    def times(self) -> list[int]:
        return [e[0] for e in self.events] + [t for c in self.counts for t in c[3]]


def pair_key(exe: Optional[bytes], path: Optional[bytes]) -> bytes:
    """The collector's key of a pair: msgpack of ``[exe, path]`` (nil works)."""
    return bytes(msgpack.packb([exe, path], use_bin_type=True))


def rows_of(batch: Batch | RowBatch) -> RowBatch:
    """A decoded :class:`Batch` in storage form (what :func:`decode_rows` gives for its body)."""
    if isinstance(batch, RowBatch):
        return batch
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    return RowBatch(
        batch.batch_id,
        batch.epoch,
        batch.seq,
        batch.agent_id,
        batch.host_name,
        batch.sent_at,
        tuple(
            (e.ts, pack([e.exe, e.path]), e.exe, e.path, pack({"action": e.action, **e.detail}))
            for e in batch.events
        ),
        tuple((pack([c.exe, c.path]), c.exe, c.path, c.times) for c in batch.counts),
        batch.gaps,
        batch.version,
    )


_HDR = tuple[int, str, str, int, str, str, int]
_Ev = tuple[int, str, Optional[bytes], Optional[bytes], dict[str, Any]]
_Ct = tuple[Optional[bytes], Optional[bytes], tuple[int, ...]]

# Detail fields by kind, for the fast path (one dict lookup per field present).
_K_INT31, _K_STR, _K_BIN, _K_ETYPE, _K_FILE = range(5)
_KIND = {k: _K_INT31 for k in _DETAIL_INT}
_KIND.update({k: _K_STR for k in _DETAIL_STR})
_KIND.update({k: _K_BIN for k in _DETAIL_BIN})
_KIND.update({"etype": _K_ETYPE, "file": _K_FILE})
_FILE_KIND = {k: 0 for k in _FILE_INT}
_FILE_KIND.update({"sha256": 1, "sample": 2, "gone": 3})
_INT31 = (1 << 31) - 1


def _event_fast(e: Any) -> Optional[_Ev]:
    """One ``<event>``, validated with as few calls as possible; None when
    anything is not plainly valid (the slow path then names the error).
    Accepts exactly a subset of what :func:`_event_slow` accepts, with the same
    result (detail fields in wire order)."""
    if type(e) is not dict:
        return None
    action = e.get("action")
    ts = e.get("ts")
    exe = e.get("exe")
    path = e.get("path")
    if (
        action not in ACTIONS
        or type(ts) is not int
        or not 0 <= ts <= MAX_TS
        or (exe is not None and (type(exe) is not bytes or not exe))
        or (path is not None and (type(path) is not bytes or not path))
    ):
        return None
    out: dict[str, Any] = {}
    kind = _KIND.get
    for k, v in e.items():
        t = kind(k)
        if t is None or v is None:
            continue
        if t == _K_STR:
            if type(v) is not str or len(v) > MAX_STR:
                return None
        elif t == _K_INT31:
            if type(v) is not int or not 0 <= v <= _INT31:
                return None
        elif t == _K_BIN:
            if type(v) is not bytes or not v:
                return None
        elif t == _K_ETYPE:
            if type(v) is not list:
                return None
            for x in v:
                if type(x) is not str or len(x) > 32:
                    return None
            out[k] = list(v)
            continue
        else:
            if type(v) is not dict:
                return None
            facts: dict[str, Any] = {}
            fkind = _FILE_KIND.get
            for fk, fv in v.items():
                ft = fkind(fk)
                if ft is None or fv is None:
                    continue
                if ft == 0:
                    if type(fv) is not int or not 0 <= fv <= MAX_TS:
                        return None
                elif ft == 1:
                    if type(fv) is not str or len(fv) > 64:
                        return None
                elif ft == 2:
                    if type(fv) is not bytes or not fv:
                        return None
                elif type(fv) is not bool:
                    return None
                facts[fk] = fv
            out[k] = facts
            continue
        out[k] = v
    return ts, action, exe, path, out


def _event_slow(raw: Any, i: int) -> _Ev:
    p = f"events[{i}]"
    e = _map(raw, p)
    action = e.get("action")
    if action not in ACTIONS:
        raise WireError(f"must be one of {', '.join(ACTIONS)}", f"{p}.action")
    return (
        _int(e.get("ts"), f"{p}.ts"),
        action,
        _bin(e.get("exe"), f"{p}.exe"),
        _bin(e.get("path"), f"{p}.path"),
        _detail(e, p),
    )


def _count_fast(c: Any) -> Optional[_Ct]:
    if type(c) is not list or len(c) != 3:
        return None
    exe, path, deltas = c
    if (
        (exe is not None and (type(exe) is not bytes or not exe))
        or (path is not None and (type(path) is not bytes or not path))
        or type(deltas) is not list
        or not deltas
        or set(map(type, deltas)) != {int}
        or min(deltas) < 0
    ):
        return None
    times = tuple(accumulate(deltas))
    if times[-1] > MAX_TS:  # deltas are >= 0: the last time is the largest
        return None
    return exe, path, times


def _count_slow(raw: Any, i: int) -> _Ct:
    p = f"counts[{i}]"
    c = _list(raw, p)
    if len(c) != 3:
        raise WireError("must be [exe, path, times]", p)
    deltas = _list(c[2], f"{p}[2]")
    if not deltas:
        raise WireError("must hold at least one time", f"{p}[2]")
    times = [_int(deltas[0], f"{p}[2][0]")]
    for j, d in enumerate(deltas[1:], 1):
        t = times[-1] + _int(d, f"{p}[2][{j}]")
        times.append(_int(t, f"{p}[2][{j}]"))
    return _bin(c[0], f"{p}[0]"), _bin(c[1], f"{p}[1]"), tuple(times)


def _decode(body: bytes) -> tuple[_HDR, list[_Ev], list[_Ct], list[GapRecord]]:
    """Validate a batch body completely; raise WireError naming the field."""
    doc = _map(unpack(body), "batch")
    v = doc.get("v")
    if v not in SUPPORTED_VERSIONS or isinstance(v, bool):
        raise VersionError(
            f"unsupported wire version {v!r}; supported: {', '.join(map(str, SUPPORTED_VERSIONS))}", "v"
        )
    batch_id = _str(doc.get("batch_id"), "batch_id", 32)
    epoch = _str(doc.get("epoch"), "epoch", 32)
    if not _HEX32.match(batch_id):
        raise WireError("must be 32 lowercase hex digits", "batch_id")
    if not _HEX32.match(epoch):
        raise WireError("must be 32 lowercase hex digits", "epoch")
    agent_id = _str(doc.get("agent_id"), "agent_id", MAX_ID)
    if not valid_agent_id(agent_id):
        raise WireError("must be 1-128 of A-Z a-z 0-9 . _ : @ -", "agent_id")
    host_name = _str(doc.get("host_name"), "host_name", 255, empty=False)
    seq = _int(doc.get("seq"), "seq", 1)
    sent_at = _int(doc.get("sent_at"), "sent_at")

    events = []
    for i, raw in enumerate(_list(doc.get("events", []), "events")):
        ev = _event_fast(raw)
        events.append(_event_slow(raw, i) if ev is None else ev)
    counts = []
    n_times = 0
    for i, raw in enumerate(_list(doc.get("counts", []), "counts")):
        ct = _count_fast(raw)
        if ct is None:
            ct = _count_slow(raw, i)
        n_times += len(ct[2])
        counts.append(ct)
    gaps = []
    for i, raw in enumerate(_list(doc.get("gaps", []), "gaps")):
        p = f"gaps[{i}]"
        g = _map(raw, p)
        start, end = _int(g.get("start"), f"{p}.start"), _int(g.get("end"), f"{p}.end")
        if end < start:
            raise WireError("end before start", p)
        gaps.append(
            GapRecord(
                start, end, _int(g.get("lost", 0), f"{p}.lost"), _str(g.get("reason"), f"{p}.reason", 64)
            )
        )
    if len(events) + n_times + len(gaps) > MAX_RECORDS:
        raise WireError(f"more than {MAX_RECORDS} records", "batch")
    if not events and not counts and not gaps:
        raise WireError("holds no record", "batch")
    return (v, batch_id, epoch, seq, agent_id, host_name, sent_at), events, counts, gaps


def decode_batch(body: bytes) -> Batch:
    """Validate a batch body completely; raise WireError naming the field."""
    (v, batch_id, epoch, seq, agent_id, host_name, sent_at), events, counts, gaps = _decode(body)
    return Batch(
        batch_id,
        epoch,
        seq,
        agent_id,
        host_name,
        sent_at,
        tuple(EventRecord(ts, action, exe, path, detail) for ts, action, exe, path, detail in events),
        tuple(CountRecord(exe, path, times) for exe, path, times in counts),
        tuple(gaps),
        v,
    )


def decode_rows(body: bytes) -> RowBatch:
    """:func:`decode_batch` (the same checks, the same errors), in storage form:
    each event's detail packed once here, the pair keys computed. The collector
    runs this in a worker process, so decoding and the store use two cores."""
    (v, batch_id, epoch, seq, agent_id, host_name, sent_at), events, counts, gaps = _decode(body)
    pack = msgpack.Packer(use_bin_type=True).pack
    return RowBatch(
        batch_id,
        epoch,
        seq,
        agent_id,
        host_name,
        sent_at,
        tuple(
            (ts, pack([exe, path]), exe, path, pack({"action": action, **detail}))
            for ts, action, exe, path, detail in events
        ),
        tuple((pack([exe, path]), exe, path, times) for exe, path, times in counts),
        tuple(gaps),
        v,
    )


# ---------------------------------------------------------------- agent side

MAX_CMD = 4096  # a command line is cut here (with a marker) before it is stored


def event_map(ev: Any, facts: Any = None) -> dict[str, Any]:
    """A FileEvent as an ``<event>`` map with full detail (see the docstring).

    One pass, keys in a fixed order, absent values left out (this runs once
    per detailed event in a burst, so it builds no second dict to filter)."""
    p, u = ev.process, ev.user
    out: dict[str, Any] = {
        "ts": ev.ts_ms,
        "action": ev.action,
        "exe": p.executable or None,
        "path": ev.path or None,
        "etype": [t[:32] for t in ev.event_type],
        "attr": ev.attribution,
    }
    if ev.original_path:
        out["orig"] = ev.original_path
    v: Any = p.pid
    if v is not None and 0 <= v < _PID_END:
        out["pid"] = v
    v = p.ppid
    if v is not None and 0 <= v < _PID_END:
        out["ppid"] = v
    if p.name is not None:
        out["pname"] = _cut(p.name)
    if p.command_line is not None:
        out["cmd"] = _cut(p.command_line)
    if u.id is not None:
        out["uid"] = _cut(u.id)
    if u.name is not None:
        out["uname"] = _cut(u.name)
    if p.parent_name is not None:
        out["ppname"] = _cut(p.parent_name)
    if p.parent_executable:
        out["ppexe"] = p.parent_executable
    if facts is not None:
        out["file"] = facts_map(facts)
    return out


class EventPacker:
    """``msgpack.packb(event_map(ev), use_bin_type=True)``, the same bytes, in
    half the time: the parts of the map that come from the process, the user
    and the (action, event type, attribution) are packed once per object or
    value and spliced in (the resolver hands the same ProcessInfo and
    UserInfo to every event of a process). An object is cached the second
    time it is seen (a recorded file makes new ones for every event: those
    take the plain way, at the cost of one lookup); by identity (a cached
    object is kept alive, so its id cannot be reused). Each cache is emptied
    at ``cache_max`` entries. Not thread-safe: one per writer."""

    def __init__(self, cache_max: int = 1024) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._cache_max = cache_max
        self._seen: dict[int, Any] = {}  # id -> a process or user seen once
        self._procs: dict[int, tuple[Any, bytes, bytes, bytes, int]] = {}  # id -> (p, exe, mid, end, keys)
        self._users: dict[int, tuple[Any, bytes, int]] = {}  # id -> (u, part, keys)
        self._kinds: dict[tuple[Any, Any, Any], tuple[bytes, bytes]] = {}  # -> (action part, etype+attr part)

    def pack(self, ev: Any) -> tuple[bytes, int]:
        """The packed ``<event>`` map of ``ev`` and how many keys it has."""
        pack, p, u = self._pack, ev.process, ev.user
        proc = self._procs.get(id(p))
        user = self._users.get(id(u))
        if proc is None or user is None or proc[0] is not p or user[0] is not u:
            proc = proc if proc is not None and proc[0] is p else self._proc(p) if self._again(p) else None
            user = user if user is not None and user[0] is u else self._user(u) if self._again(u) else None
            if proc is None or user is None:
                doc = event_map(ev)
                return pack(doc), len(doc)
        kind = self._kind(ev.action, ev.event_type, ev.attribution)
        keys = 6 + proc[4] + user[2]
        orig = b""
        if ev.original_path:
            keys += 1
            orig = b"\xa4orig" + pack(ev.original_path)
        body = b"".join(
            (
                bytes((0x80 | keys,)),  # keys <= 15: a fixmap
                b"\xa2ts",
                pack(ev.ts_ms),
                kind[0],
                proc[1],
                b"\xa4path",
                pack(ev.path or None),
                kind[1],
                orig,
                proc[2],
                user[1],
                proc[3],
            )
        )
        return body, keys

    def _again(self, obj: Any) -> bool:
        """Was ``obj`` seen before? (It is remembered if not.)"""
        if self._seen.get(id(obj)) is obj:
            return True
        if len(self._seen) >= self._cache_max:
            self._seen.clear()
        self._seen[id(obj)] = obj
        return False

    def _kind(self, action: Any, etype: Any, attr: Any) -> tuple[bytes, bytes]:
        try:
            got = self._kinds.get((action, etype, attr))
        except TypeError:  # an unhashable value from a recorded document: pack it as it is
            got = None
        if got is not None:
            return got
        pack = self._pack
        got = (
            b"\xa6action" + pack(action),
            b"\xa5etype" + pack([t[:32] for t in etype]) + b"\xa4attr" + pack(attr),
        )
        if len(self._kinds) >= self._cache_max:
            self._kinds.clear()
        try:
            self._kinds[(action, etype, attr)] = got
        except TypeError:
            pass
        return got

    def _proc(self, p: Any) -> tuple[Any, bytes, bytes, bytes, int]:
        pack = self._pack
        mid, end = [], []
        v = p.pid
        if v is not None and 0 <= v < _PID_END:
            mid.append(b"\xa3pid" + pack(v))
        v = p.ppid
        if v is not None and 0 <= v < _PID_END:
            mid.append(b"\xa4ppid" + pack(v))
        if p.name is not None:
            mid.append(b"\xa5pname" + pack(_cut(p.name)))
        if p.command_line is not None:
            mid.append(b"\xa3cmd" + pack(_cut(p.command_line)))
        if p.parent_name is not None:
            end.append(b"\xa6ppname" + pack(_cut(p.parent_name)))
        if p.parent_executable:
            end.append(b"\xa5ppexe" + pack(p.parent_executable))
        got = (p, b"\xa3exe" + pack(p.executable or None), b"".join(mid), b"".join(end), len(mid) + len(end))
        if len(self._procs) >= self._cache_max:
            self._procs.clear()
        self._procs[id(p)] = got
        return got

    def _user(self, u: Any) -> tuple[Any, bytes, int]:
        pack = self._pack
        parts = []
        if u.id is not None:
            parts.append(b"\xa3uid" + pack(_cut(u.id)))
        if u.name is not None:
            parts.append(b"\xa5uname" + pack(_cut(u.name)))
        got = (u, b"".join(parts), len(parts))
        if len(self._users) >= self._cache_max:
            self._users.clear()
        self._users[id(u)] = got
        return got


def facts_map(facts: Any) -> dict[str, Any]:
    """FileFacts as the ``file`` map of an ``<event>``."""
    f = {
        "size": facts.size,
        "mode": facts.mode,
        "uid": facts.uid,
        "gid": facts.gid,
        "sha256": facts.sha256,
        "sample": facts.sample or None,
        "gone": facts.gone,
    }
    return {k: v for k, v in f.items() if v is not None}


_PID_END = 1 << 31  # a pid the collector accepts is below this; else none is sent at all


def _cut(text: str) -> str:
    if text.isascii() and len(text) <= MAX_CMD:  # the common case: nothing to replace or cut
        return text
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # no lone surrogates on the wire
    return text if len(text) <= MAX_CMD else text[: MAX_CMD - 3] + "..."
