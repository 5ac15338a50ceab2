"""Recorded ECS documents (NDJSON) as events: for tests, and for admins who
want to try the rule on data they already have.

Nested objects and dotted keys are both read (``{"process": {"name": x}}``
and ``{"process.name": x}``), ``event.type`` as an array or a scalar,
unknown fields ignored. As in ES|QL, a field holding several values is null
for the equality tests, so it never matches. A line that is not a JSON
object with a usable ``@timestamp`` is reported with its line number and
skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from agent.shared.events import RECORDED, FileEvent, ProcessInfo, UserInfo
from agent.shared.text import parse_timestamp, to_bytes


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


def get(doc: dict[str, Any], dotted: str) -> Any:
    """A field by its dotted name, however the document splits it: dotted
    keys, nested objects or a mix (``{"host.os": {"type": x}}``). Found in
    more than one place it has several values, as Elasticsearch would index
    it: a list, which :func:`scalar` makes null."""
    hits = _hits(doc, dotted.split("."))
    if not hits:
        return None
    if len(hits) == 1:
        return hits[0]
    return [v for hit in hits for v in (hit if isinstance(hit, list) else [hit])]


def _hits(cur: Any, parts: list[str]) -> list[Any]:
    if not parts:
        return [cur]
    if not isinstance(cur, dict):
        return []
    out: list[Any] = []
    for i in range(1, len(parts) + 1):
        key = ".".join(parts[:i])
        if key in cur:
            out.extend(_hits(cur[key], parts[i:]))
    return out


def scalar(value: Any) -> Any:
    """ES|QL: a one-element list is its element; several values are null."""
    if isinstance(value, list):
        return value[0] if len(value) == 1 else None
    return value


def keyword(value: Any) -> Optional[str]:
    """A keyword field as ES indexes it: numbers and booleans become text."""
    value = scalar(value)
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def integer(value: Any) -> Optional[int]:
    """A pid-like number, or None when absent or out of [0, 2^31)."""
    value = scalar(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and 0 <= value < (1 << 31):
        return value
    return None


def to_event(doc: dict[str, Any]) -> FileEvent:
    """One ECS document as a FileEvent (ValueError when it has no time)."""
    etype = get(doc, "event.type")
    etypes = tuple(str(t) for t in etype) if isinstance(etype, list) else ((str(etype),) if etype else ())
    action = keyword(get(doc, "event.action")) or ""
    return FileEvent(
        ts_ms=parse_timestamp(scalar(get(doc, "@timestamp"))),
        action=action,
        path=to_bytes(keyword(get(doc, "file.path"))),
        process=ProcessInfo(
            pid=integer(get(doc, "process.pid")),
            name=keyword(get(doc, "process.name")),
            executable=to_bytes(keyword(get(doc, "process.executable"))),
            ppid=integer(get(doc, "process.parent.pid")),
            command_line=keyword(get(doc, "process.command_line")),
            parent_name=keyword(get(doc, "process.parent.name")),
            parent_executable=to_bytes(keyword(get(doc, "process.parent.executable"))),
        ),
        user=UserInfo(id=keyword(get(doc, "user.id")), name=keyword(get(doc, "user.name"))),
        event_type=etypes,
        original_path=to_bytes(keyword(get(doc, "file.Ext.original.path"))),
        os_type=keyword(get(doc, "host.os.type")),
        attribution=RECORDED,
    )


def read_ndjson(path: str) -> Iterator[FileEvent | BadLine]:
    """Events in file order; a bad line yields BadLine instead of raising."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw)
                if not isinstance(doc, dict):
                    raise ValueError("not a JSON object")
                yield to_event(doc)
            except (ValueError, TypeError, OverflowError, RecursionError) as e:
                yield BadLine(n, " ".join(str(e).split())[:200] or type(e).__name__)
