"""Every byte of a batch is made here: the agent's event maps, packed once per
event, and the batch map they are spliced into (format: :mod:`.format`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from agent.shared.wire.format import MAX_CMD, MAX_CTR, Batch, EventRecord


def encode_event(rec: EventRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"ts": rec.ts, "action": rec.action, "exe": rec.exe, "path": rec.path}
    out.update(rec.detail)
    return out


def encode_times(times: list[int]) -> list[int]:
    times = sorted(times)
    return [times[0]] + [b - a for a, b in zip(times, times[1:])] if times else []


def encode_batch(batch: Batch) -> bytes:
    doc: dict[str, Any] = {
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
    if any(c.actor is not None for c in batch.counts):
        doc["actors"] = [None if c.actor is None else list(c.actor) for c in batch.counts]
    if batch.rules:
        doc.update(rules=list(batch.rules), erules=list(batch.event_rules), crules=list(batch.count_rules))
    if batch.host_id:
        doc["host_id"] = batch.host_id
    return bytes(msgpack.packb(doc, use_bin_type=True))


def event_map(ev: Any, facts: Any = None) -> dict[str, Any]:  # noqa: PLR0912 - one pass, no second dict
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
    if ev.host_path:  # where EventPacker puts it: the same bytes
        out["hpath"] = ev.host_path
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
    if p.container is not None:
        out["ctr"] = container_map(p.container)
    v = p.vpid
    if v is not None and 0 <= v < _PID_END:
        out["vpid"] = v
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
        if ev.host_path:  # a container's event: where the host sees it
            keys += 1
            orig += b"\xa5hpath" + pack(ev.host_path)
        body = b"".join(
            (
                bytes((0x80 | keys,)) if keys <= 15 else b"\xde" + keys.to_bytes(2, "big"),  # fixmap, map16
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
        if p.container is not None:
            end.append(b"\xa3ctr" + pack(container_map(p.container)))
        v = p.vpid
        if v is not None and 0 <= v < _PID_END:
            end.append(b"\xa4vpid" + pack(v))
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


def container_map(c: Any) -> dict[str, Any]:
    """ContainerInfo as the ``ctr`` map of an ``<event>``."""
    f = {"id": c.id, "rt": c.runtime, "name": c.name, "image": c.image}
    return {k: _cut(v)[:MAX_CTR] for k, v in f.items() if v is not None}


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


def pack_batch(
    head: dict[str, Any], events: list[bytes], gaps: list[bytes], notes: Sequence[bytes] = ()
) -> bytes:
    """The batch map with the stored event, gap and note maps spliced in as
    bytes: the same msgpack as packing the decoded records, without decoding
    them (``notes`` only when there are some: an older collector never sees it)."""
    packer = msgpack.Packer(use_bin_type=True)
    out = [packer.pack_map_header(len(head) + 2 + bool(notes))]
    out.extend(packer.pack(k) + packer.pack(v) for k, v in head.items())
    out.append(packer.pack("events") + packer.pack_array_header(len(events)))
    out.extend(events)
    out.append(packer.pack("gaps") + packer.pack_array_header(len(gaps)))
    out.extend(gaps)
    if notes:
        out.append(packer.pack("notes") + packer.pack_array_header(len(notes)))
        out.extend(notes)
    return b"".join(out)
