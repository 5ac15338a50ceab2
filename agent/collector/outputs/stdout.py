"""Alerts on stdout: one summary line each, or the JSON document."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Optional, TextIO

from agent.shared.text import dumps


def alert_field(doc: dict[str, Any], *path: str) -> Any:
    cur: Any = doc
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


OPTIONAL = ("cc", "gap_on_other_agents")


class StdoutOutput:
    """``summary``: one readable key=value line per alert, every value
    JSON-escaped; ``json``: the full alert document, one a line."""

    def __init__(self, stream: Optional[TextIO] = None, name: str = "stdout", fmt: str = "summary") -> None:
        self.name = name
        self.stream = stream if stream is not None else sys.stdout
        self.fmt = fmt

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        for a in alerts:
            if self.fmt == "json":
                self.stream.write(dumps(a) + "\n")
                continue
            fields = (
                ("time", a.get("@timestamp")),
                ("rule", alert_field(a, "rule", "name")),
                ("host", alert_field(a, "host", "name")),
                ("agent", alert_field(a, "agent", "id")),
                ("exe", alert_field(a, "process", "executable")),
                ("path", alert_field(a, "file", "path")),
                ("cc", alert_field(a, "rarewrite", "cc")),
                ("gap_on_other_agents", alert_field(a, "rarewrite", "gap_on_other_agents")),
                ("id", alert_field(a, "kibana", "alert", "uuid")),
            )
            # cc and gap_on_other_agents are the first rule's: the other rules' alerts have neither
            shown = [(k, v) for k, v in fields if v is not None or k not in OPTIONAL]
            self.stream.write("ALERT " + " ".join(f"{k}={dumps(v)}" for k, v in shown) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()
