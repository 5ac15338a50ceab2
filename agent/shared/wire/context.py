"""The enrichment parts of the wire (format 1, additive; an older collector
ignores them): an event's ``ctx`` map and the batch's ``notes``.

``ctx`` (on a detailed event, read by the agent with the file's facts)::

    pkg:  {own: bool, mgr: str, name: str, diff: bool}   the installed package owning
          the path (diff: the file differs from the packaged one; absent: unknown)
    root: {in: bool, srv: str, dir: bin, url: str, exec: bool}   the web root holding it
    sig:  [str]          content signals (absent: not scanned)
    req:  [<req>]        the web requests logged around the write, nearest first

``<req>`` is one access-log line: ``{ts, ip, m, url, st, n, ua, ref, log, w}``
(``w``: logged within the write's window). A ``<note>`` comes after the
event it is about: ``{ts, exe, path, kind, reqs | act}``, ``kind`` ``req``
(requests seen after the event was sent: the new file requested, a late log
line) or ``act`` (what the agent did about an alert: ``{id, alert, rule,
result, qid, why}``).
"""

from __future__ import annotations

from typing import Any, Optional

import msgpack

from agent.shared.errors import WireError
from agent.shared.wire.fields import _bin, _int, _list, _map, _str

MAX_REQS = 8  # candidate requests of one event
MAX_NOTE_REQS = 64  # requests in one note
MAX_SIGNALS = 32
MAX_URL = 8192
NOTE_KINDS = ("req", "act")
_REQ_STR = (("ip", 64), ("m", 32), ("url", MAX_URL), ("ua", 1024), ("ref", MAX_URL), ("log", 4096))


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise WireError("must be a boolean", path)
    return v


def _strs(v: Any, path: str, limit: int, max_items: int) -> list[str]:
    items = _list(v, path)
    if len(items) > max_items:
        raise WireError(f"more than {max_items} entries", path)
    return [_str(x, f"{path}[{i}]", limit) for i, x in enumerate(items)]


def request_map(v: Any, path: str) -> dict[str, Any]:
    r = _map(v, path)
    out: dict[str, Any] = {"ts": _int(r.get("ts"), f"{path}.ts")}
    for k, limit in _REQ_STR:
        if r.get(k) is not None:
            out[k] = _str(r[k], f"{path}.{k}", limit)
    for k, hi in (("st", 999), ("n", 1 << 62)):
        if r.get(k) is not None:
            out[k] = _int(r[k], f"{path}.{k}", 0, hi)
    if r.get("w") is not None:
        out["w"] = _bool(r["w"], f"{path}.w")
    return out


def _requests(v: Any, path: str, max_items: int) -> list[dict[str, Any]]:
    items = _list(v, path)
    if len(items) > max_items:
        raise WireError(f"more than {max_items} requests", path)
    return [request_map(x, f"{path}[{i}]") for i, x in enumerate(items)]


def _package(v: Any, path: str) -> dict[str, Any]:
    p = _map(v, path)
    out: dict[str, Any] = {"own": _bool(p.get("own"), f"{path}.own")}
    for k, limit in (("mgr", 16), ("name", 256)):
        if p.get(k) is not None:
            out[k] = _str(p[k], f"{path}.{k}", limit)
    if p.get("diff") is not None:
        out["diff"] = _bool(p["diff"], f"{path}.diff")
    return out


def _root(v: Any, path: str) -> dict[str, Any]:
    r = _map(v, path)
    out: dict[str, Any] = {"in": _bool(r.get("in"), f"{path}.in")}
    if r.get("srv") is not None:
        out["srv"] = _str(r["srv"], f"{path}.srv", 16)
    if r.get("dir") is not None:
        out["dir"] = _bin(r["dir"], f"{path}.dir")
    if r.get("url") is not None:
        out["url"] = _str(r["url"], f"{path}.url", MAX_URL)
    if r.get("exec") is not None:
        out["exec"] = _bool(r["exec"], f"{path}.exec")
    return out


def context_map(v: Any, path: str) -> dict[str, Any]:
    """An event's ``ctx``, validated (unknown keys dropped)."""
    c = _map(v, path)
    out: dict[str, Any] = {}
    if c.get("pkg") is not None:
        out["pkg"] = _package(c["pkg"], f"{path}.pkg")
    if c.get("root") is not None:
        out["root"] = _root(c["root"], f"{path}.root")
    if c.get("sig") is not None:
        out["sig"] = _strs(c["sig"], f"{path}.sig", 128, MAX_SIGNALS)
    if c.get("req") is not None:
        out["req"] = _requests(c["req"], f"{path}.req", MAX_REQS)
    return out


def _action(v: Any, path: str) -> dict[str, Any]:
    a = _map(v, path)
    out: dict[str, Any] = {"id": _int(a.get("id"), f"{path}.id")}
    for k, limit in (("alert", 128), ("rule", 128), ("result", 32), ("qid", 64), ("why", 1024)):
        if a.get(k) is not None:
            out[k] = _str(a[k], f"{path}.{k}", limit)
    return out


def note_record(v: Any, path: str) -> tuple[int, Optional[bytes], Optional[bytes], str, bytes]:
    """A ``<note>`` in storage form: (event ts, exe, path, kind, msgpack body)."""
    n = _map(v, path)
    kind = n.get("kind")
    if kind not in NOTE_KINDS:
        raise WireError(f"must be one of {', '.join(NOTE_KINDS)}", f"{path}.kind")
    ts = _int(n.get("ts"), f"{path}.ts")
    exe, fpath = _bin(n.get("exe"), f"{path}.exe"), _bin(n.get("path"), f"{path}.path")
    body: dict[str, Any] = {}
    if kind == "req":
        body["reqs"] = _requests(n.get("reqs"), f"{path}.reqs", MAX_NOTE_REQS)
    else:
        body["act"] = _action(n.get("act"), f"{path}.act")
    return ts, exe, fpath, kind, msgpack.packb(body, use_bin_type=True)
