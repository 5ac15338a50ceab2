"""What the agents read around a write, in the alert documents.

An event's ``ctx`` (agent.shared.wire.context) becomes fields of its
original event: ``rarewrite.package.*``, ``rarewrite.web_root.*``,
``rarewrite.content.signals``, the likeliest writing request as ECS
``source.ip`` / ``http.*`` / ``url.original`` / ``user_agent.original`` and
all candidates in ``rarewrite.requests``; notes that arrived before the
alert add ``rarewrite.followup_requests`` (one that arrives after it is a
document of its own: agent.collector.responses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.collector.storage.notes import Note
from agent.shared.text import iso, visible

MAX_NOTES = 16  # notes about one event in its alert (an agent sends 64 follow-ups a file at most)


def request_fields(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"@timestamp": iso(r["ts"])}
    for src, dst in (("ip", "source.ip"), ("m", "http.request.method"), ("url", "url.original"),
                     ("st", "http.response.status_code"), ("n", "http.response.body.bytes"),
                     ("ua", "user_agent.original"), ("ref", "http.request.referrer"),
                     ("log", "log.file.path")):  # fmt: skip
        if r.get(src) not in (None, ""):
            out[dst] = r[src]
    if "w" in r:
        out["rarewrite.in_write_window"] = r["w"]
    return out


def context_fields(ctx: dict[str, Any]) -> dict[str, Any]:
    """An event's ``ctx`` as dotted fields of its original-event document."""
    doc: dict[str, Any] = {}
    pkg = ctx.get("pkg")
    if pkg is not None:
        doc["rarewrite.package.owned"] = pkg["own"]
        for src, dst in (("mgr", "manager"), ("name", "name"), ("diff", "differs")):
            if src in pkg:
                doc[f"rarewrite.package.{dst}"] = pkg[src]
    root = ctx.get("root")
    if root is not None:
        doc["rarewrite.web_root.inside"] = root["in"]
        if "dir" in root:
            doc["rarewrite.web_root.path"] = visible(root["dir"])
        for src, dst in (("srv", "server"), ("url", "url"), ("exec", "executable")):
            if src in root:
                doc[f"rarewrite.web_root.{dst}"] = root[src]
    if "sig" in ctx:
        doc["rarewrite.content.signals"] = list(ctx["sig"])
    reqs = ctx.get("req")
    if reqs is not None:
        doc["rarewrite.requests"] = [request_fields(r) for r in reqs]
        if reqs:  # the agent sends the likeliest writer first
            best = request_fields(reqs[0])
            skip = ("@timestamp", "log.file.path", "rarewrite.in_write_window")
            doc.update((k, v) for k, v in best.items() if k not in skip)
    return doc


def notes_fields(notes: Sequence[Note]) -> dict[str, Any]:
    """Notes about one event, as fields of its document: requests for the
    file after the write, and late lines of the write's window."""
    later: list[dict[str, Any]] = []
    window: list[dict[str, Any]] = []
    for n in notes:
        for r in n.body.get("reqs", ()):
            (window if r.get("w") else later).append(request_fields(r))
    out: dict[str, Any] = {}
    if later:
        out["rarewrite.followup_requests"] = later
    if window:
        out["rarewrite.late_requests"] = window
    return out


def with_notes(events: list[dict[str, Any]], notes: Sequence[Note]) -> None:
    """Add the notes to the event documents they are about (agent, time)."""
    by_event: dict[tuple[str, str], list[Note]] = {}
    for n in notes:
        if n.kind == "req":
            by_event.setdefault((n.agent_id, iso(n.event_ts)), []).append(n)
    for doc in events:
        got = by_event.get((doc.get("agent.id", ""), doc.get("@timestamp", "")))
        if got:
            doc.update(notes_fields(got[:MAX_NOTES]))
