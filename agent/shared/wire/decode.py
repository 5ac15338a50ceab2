"""The collector's side of the wire: msgpack with every limit explicit, each
field validated with its path, and the storage form of a batch."""

from __future__ import annotations

from itertools import accumulate
from typing import Any, Optional

import msgpack

from agent.shared.errors import VersionError, WireError
from agent.shared.events import Actor
from agent.shared.wire.context import context_map, note_record
from agent.shared.wire.fields import _bin, _int, _list, _map, _str
from agent.shared.wire.format import (
    _HEX32,
    ACTIONS,
    MAX_BIN,
    MAX_BODY,
    MAX_CTR,
    MAX_ID,
    MAX_OBJECTS,
    MAX_RECORDS,
    MAX_RULE_BITS,
    MAX_STR,
    MAX_TS,
    SUPPORTED_VERSIONS,
    Batch,
    CountRecord,
    EventRecord,
    GapRecord,
    RowBatch,
    actor_key,
    valid_agent_id,
)


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


def _bounded() -> tuple[Any, Any]:
    """Hooks for one body that count every object the unpacker builds inside
    a container and stop it past MAX_OBJECTS: a body of one-byte empty maps
    would otherwise cost some 70 times its size before any schema check."""
    left = [MAX_OBJECTS]

    def pairs(items: list[tuple[Any, Any]]) -> dict[str, Any]:
        left[0] -= 2 * len(items)
        if left[0] < 0:
            raise WireError(f"more than {MAX_OBJECTS} objects in the body")
        return _pairs(items)

    def array(items: list[Any]) -> list[Any]:
        left[0] -= len(items)
        if left[0] < 0:
            raise WireError(f"more than {MAX_OBJECTS} objects in the body")
        return items

    return pairs, array


def unpack(body: bytes) -> Any:
    """msgpack bytes to Python objects, with every limit explicit.

    Raises WireError for anything that is not one well-formed, bounded
    msgpack object: truncation, trailing bytes, reserved bytes, ext types,
    non-string or duplicate map keys, excessive nesting or lengths, more than
    MAX_OBJECTS objects in all.
    """
    if len(body) > MAX_BODY:
        raise WireError(f"body of {len(body)} bytes exceeds {MAX_BODY}")
    pairs, array = _bounded()
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=pairs,
            list_hook=array,
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


_DETAIL_INT = ("pid", "ppid", "vpid")
_DETAIL_STR = ("pname", "cmd", "uid", "uname", "attr", "ppname")
_DETAIL_BIN = ("orig", "ppexe", "hpath")
_CONTAINER_STR = ("id", "rt", "name", "image")
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
        out["file"] = _file_facts(_map(e["file"], f"{path}.file"), f"{path}.file")
    if e.get("ctr") is not None:
        c = _map(e["ctr"], f"{path}.ctr")
        out["ctr"] = {
            k: _str(c[k], f"{path}.ctr.{k}", MAX_CTR) for k in _CONTAINER_STR if c.get(k) is not None
        }
    if e.get("ctx") is not None:
        out["ctx"] = context_map(e["ctx"], f"{path}.ctx")
    return out


def _file_facts(f: dict[str, Any], path: str) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for k in _FILE_INT:
        if f.get(k) is not None:
            facts[k] = _int(f[k], f"{path}.{k}", 0, MAX_TS)
    if f.get("sha256") is not None:
        facts["sha256"] = _str(f["sha256"], f"{path}.sha256", 64)
    if f.get("sample") is not None:
        facts["sample"] = _bin(f["sample"], f"{path}.sample")
    if f.get("gone") is not None:
        if not isinstance(f["gone"], bool):
            raise WireError("must be a boolean", f"{path}.gone")
        facts["gone"] = f["gone"]
    return facts


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
            (
                e.ts,
                pack([e.exe, e.path]),
                e.exe,
                e.path,
                pack({"action": e.action, **e.detail}),
                _actor(e.detail),
            )
            for e in batch.events
        ),
        tuple((pack([c.exe, c.path]), c.exe, c.path, c.times, actor_key(c.actor)) for c in batch.counts),
        batch.gaps,
        batch.version,
        batch.rules,
        batch.event_rules,
        batch.count_rules,
        batch.host_id,
        batch.notes,
    )


def _actor(detail: dict[str, Any]) -> Optional[bytes]:
    """The actor key of an event's detail (see :func:`actor_key`)."""
    return actor_key((detail.get("pname"), detail.get("uname"), detail.get("uid")))


def _actors(raw: Any, n_counts: int) -> list[Optional[Actor]]:
    """The optional ``actors`` list: one nil or [pname, uname, uid] per count."""
    if raw is None:
        return [None] * n_counts
    items = _list(raw, "actors")
    if len(items) != n_counts:
        raise WireError(f"must hold one entry per count ({n_counts}), got {len(items)}", "actors")
    out: list[Optional[Actor]] = []
    for i, raw_actor in enumerate(items):
        if raw_actor is None:
            out.append(None)
            continue
        a = _list(raw_actor, f"actors[{i}]")
        if len(a) != 3:
            raise WireError("must be [pname, uname, uid]", f"actors[{i}]")
        v = [None if x is None else _str(x, f"actors[{i}][{j}]") for j, x in enumerate(a)]
        out.append((v[0], v[1], v[2]))
    return out


_HDR = tuple[int, str, str, int, str, str, int]
_Ev = tuple[int, str, Optional[bytes], Optional[bytes], dict[str, Any]]
_Ct = tuple[Optional[bytes], Optional[bytes], tuple[int, ...]]
_Note = tuple[int, Optional[bytes], Optional[bytes], str, bytes]
_CtA = tuple[Optional[bytes], Optional[bytes], tuple[int, ...], Optional[Actor]]

# Detail fields by kind, for the fast path (one dict lookup per field present).
_K_INT31, _K_STR, _K_BIN, _K_ETYPE, _K_FILE, _K_CTR, _K_CTX = range(7)
_KIND = {k: _K_INT31 for k in _DETAIL_INT}
_KIND.update({k: _K_STR for k in _DETAIL_STR})
_KIND.update({k: _K_BIN for k in _DETAIL_BIN})
_KIND.update({"etype": _K_ETYPE, "file": _K_FILE, "ctr": _K_CTR, "ctx": _K_CTX})
_FILE_KIND = {k: 0 for k in _FILE_INT}
_FILE_KIND.update({"sha256": 1, "sample": 2, "gone": 3})
_INT31 = (1 << 31) - 1


def _container_fast(v: Any) -> Optional[dict[str, str]]:
    if type(v) is not dict:
        return None
    out = {}
    for k in _CONTAINER_STR:
        x = v.get(k)
        if x is not None:
            if type(x) is not str or len(x) > MAX_CTR:
                return None
            out[k] = x
    return out


def _context_fast(v: Any) -> Optional[dict[str, Any]]:
    try:
        return context_map(v, "ctx")
    except WireError:
        return None


def _event_fast(e: Any) -> Optional[_Ev]:  # noqa: PLR0912 - the decoder's hot path: one pass, few calls
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
        elif t == _K_CTR:
            ctr = _container_fast(v)
            if ctr is None:
                return None
            out[k] = ctr
            continue
        elif t == _K_CTX:  # rare (an event's first few in the hour): the one validator
            out[k] = _context_fast(v)
            if out[k] is None:
                return None
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


_Rules = tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...], str]


def _rule_fields(doc: dict[str, Any], n_events: int, n_counts: int) -> _Rules:
    """``rules``, ``erules``, ``crules`` and ``host_id`` (see the format)."""
    host_id = "" if doc.get("host_id") is None else _str(doc["host_id"], "host_id", MAX_ID)
    if doc.get("rules") is None:
        if doc.get("erules") is not None or doc.get("crules") is not None:
            raise WireError("erules and crules need rules", "rules")
        return (), (), (), host_id
    rules = tuple(
        _str(r, f"rules[{i}]", MAX_ID, empty=False) for i, r in enumerate(_list(doc["rules"], "rules"))
    )
    if not rules or len(rules) > MAX_RULE_BITS or len(set(rules)) != len(rules):
        raise WireError(f"must hold 1 to {MAX_RULE_BITS} distinct rule ids", "rules")
    top = (1 << len(rules)) - 1
    out = []
    for name, n in (("erules", n_events), ("crules", n_counts)):
        items = _list(doc.get(name, []), name)
        if len(items) != n:
            raise WireError(f"must hold one entry per {name[0]}-record ({n}), got {len(items)}", name)
        out.append(tuple(_int(m, f"{name}[{i}]", 1, top) for i, m in enumerate(items)))
    return rules, out[0], out[1], host_id


def _decode(body: bytes) -> tuple[_HDR, list[_Ev], list[_CtA], list[GapRecord], _Rules, tuple[_Note, ...]]:
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
    actors = _actors(doc.get("actors"), len(counts))
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
    raw_notes = _list(doc.get("notes", []), "notes")
    notes = tuple(note_record(raw, f"notes[{i}]") for i, raw in enumerate(raw_notes))
    if len(events) + n_times + len(gaps) + len(notes) > MAX_RECORDS:
        raise WireError(f"more than {MAX_RECORDS} records", "batch")
    if not events and not counts and not gaps and not notes:
        raise WireError("holds no record", "batch")
    with_actors = [(exe, path, times, a) for (exe, path, times), a in zip(counts, actors)]
    rules = _rule_fields(doc, len(events), len(counts))
    return (v, batch_id, epoch, seq, agent_id, host_name, sent_at), events, with_actors, gaps, rules, notes


def decode_batch(body: bytes) -> Batch:
    """Validate a batch body completely; raise WireError naming the field."""
    head, events, counts, gaps, rules, notes = _decode(body)
    v, batch_id, epoch, seq, agent_id, host_name, sent_at = head
    return Batch(
        batch_id,
        epoch,
        seq,
        agent_id,
        host_name,
        sent_at,
        tuple(EventRecord(ts, action, exe, path, detail) for ts, action, exe, path, detail in events),
        tuple(CountRecord(exe, path, times, actor) for exe, path, times, actor in counts),
        tuple(gaps),
        v,
        *rules,
        notes,
    )


def decode_rows(body: bytes) -> RowBatch:
    """:func:`decode_batch` (the same checks, the same errors), in storage form:
    each event's detail packed once here, the pair keys computed. The collector
    runs this in a worker process, so decoding and the store use two cores."""
    head, events, counts, gaps, rules, notes = _decode(body)
    v, batch_id, epoch, seq, agent_id, host_name, sent_at = head
    pack = msgpack.Packer(use_bin_type=True).pack
    return RowBatch(
        batch_id,
        epoch,
        seq,
        agent_id,
        host_name,
        sent_at,
        tuple(
            (ts, pack([exe, path]), exe, path, pack({"action": action, **detail}), _actor(detail))
            for ts, action, exe, path, detail in events
        ),
        tuple((pack([exe, path]), exe, path, times, actor_key(actor)) for exe, path, times, actor in counts),
        tuple(gaps),
        v,
        *rules,
        notes,
    )
