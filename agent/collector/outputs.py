"""Where alerts go: one small interface, an NDJSON file and stdout for now.

Webhook and syslog outputs plug in behind the same :class:`Output` interface
(a later issue); :func:`build_outputs` logs and skips their sections until then.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional, Protocol, TextIO

from agent.collector.evaluate import dumps
from agent.config import Config

log = logging.getLogger("rarewrite.collector.outputs")


class Output(Protocol):
    name: str

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        """Deliver one batch of alert documents; raise OSError on failure."""

    def close(self) -> None: ...


class NdjsonOutput:
    """Appends one JSON document a line; flush and fsync once per batch."""

    def __init__(self, path: str, name: str = "ndjson") -> None:
        self.name = name
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        if not alerts:
            return
        data = "".join(dumps(a) + "\n" for a in alerts).encode("ascii")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _field(doc: dict[str, Any], *path: str) -> Any:
    cur: Any = doc
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


class StdoutOutput:
    """One readable key=value line per alert; every value JSON-escaped."""

    def __init__(self, stream: Optional[TextIO] = None, name: str = "stdout") -> None:
        self.name = name
        self.stream = stream if stream is not None else sys.stdout

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        for a in alerts:
            fields = (
                ("time", a.get("@timestamp")),
                ("rule", _field(a, "rule", "name")),
                ("host", _field(a, "host", "name")),
                ("agent", _field(a, "agent", "id")),
                ("exe", _field(a, "process", "executable")),
                ("path", _field(a, "file", "path")),
                ("cc", a.get("cc")),
                ("gap_on_other_agents", _field(a, "rarewrite", "gap_on_other_agents")),
                ("id", _field(a, "alert", "id")),
            )
            self.stream.write("ALERT " + " ".join(f"{k}={dumps(v)}" for k, v in fields) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


def build_outputs(cfg: Config) -> list[Output]:
    """The outputs the config asks for; raises OSError if a file cannot be opened."""
    outs: list[Output] = []
    if cfg.collector.alerts_file:
        outs.append(NdjsonOutput(cfg.collector.alerts_file, "alerts_file"))
    if cfg.collector.alerts_stdout:
        outs.append(StdoutOutput())
    for o in cfg.outputs:
        if o.type == "ndjson" and o.options.get("path"):
            outs.append(NdjsonOutput(o.options["path"], o.name))
        elif o.type == "stdout":
            outs.append(StdoutOutput(name=o.name))
        else:
            log.warning(
                "event=output_skipped output=%r type=%r reason=%r", o.name, o.type, "not implemented yet"
            )
    return outs


def emit_all(outputs: Sequence[Output], alerts: Sequence[dict[str, Any]]) -> None:
    """Give every output the batch; one failing output does not stop the others."""
    for out in outputs:
        try:
            out.emit(alerts)
        except OSError as e:
            log.error("event=output_failed output=%r alerts=%d error=%r", out.name, len(alerts), str(e))
