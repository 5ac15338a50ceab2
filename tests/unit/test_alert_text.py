"""Alert outputs are valid UTF-8 whatever the file names hold: undecodable
bytes are escaped visibly (\\xNN) and the exact bytes travel in base64 beside
them (issue 16's output text item). A lone surrogate (what os.fsdecode makes
of them) is refused by strict JSON decoders such as PHP's and Perl's."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

from agent.collector import evaluate as ev
from agent.collector.outputs.ndjson import NdjsonOutput
from agent.collector.outputs.stdout import StdoutOutput
from agent.collector.storage.sqlite import CollectorStore
from agent.shared import wire
from agent.shared.rule import Rule
from agent.shared.text import raw_base64, visible

T = 1_790_000_000_000
EXE = b"/usr/bin/python3\xff"
PATH = b"/var/www/\xff\xfe\n\x1b[31m.php"
ORIG = b"/tmp/\xc3(.tmp"


def strings(doc: Any) -> list[str]:
    if isinstance(doc, dict):
        return [s for k, v in doc.items() for s in [k, *strings(v)]]
    if isinstance(doc, list):
        return [s for v in doc for s in strings(v)]
    return [doc] if isinstance(doc, str) else []


def alert(tmp_path: Path) -> dict[str, Any]:
    store = CollectorStore(str(tmp_path / "c.db"))
    store.enroll("a", "web-01", "k", T)
    agent = store.agent_for_key("k")
    assert agent is not None
    detail = {
        "pname": "python3",
        "uname": "www-data",
        "uid": "33",
        "orig": ORIG,
        "ppexe": EXE,
        "etype": ["change"],
    }
    batch = wire.Batch(
        os.urandom(16).hex(),
        "e" * 32,
        1,
        "a",
        "web-01",
        T,
        (wire.EventRecord(T - 5, "rename", EXE, PATH, detail),),
    )
    store.ingest(agent, batch, T)
    [doc] = ev.run_hourly(store, Rule(), T)
    store.close()
    return doc


def test_every_text_of_an_alert_is_valid_unicode_and_the_bytes_are_kept(tmp_path: Path) -> None:
    doc = alert(tmp_path)
    for s in strings(doc):
        s.encode("utf-8")  # a lone surrogate raises here
    assert doc["file"]["path"] == "/var/www/\\xff\\xfe\n\x1b[31m.php"
    assert doc["process"]["executable"] == "/usr/bin/python3\\xff"
    raw = doc["rarewrite"]["raw_base64"]
    assert base64.b64decode(raw["file.path"]) == PATH and base64.b64decode(raw["process.executable"]) == EXE
    [event] = doc["rarewrite"]["events"]
    assert event["file.Ext.original.path"] == "/tmp/\\xc3(.tmp"
    assert base64.b64decode(event["rarewrite.raw_base64.file.Ext.original.path"]) == ORIG
    assert base64.b64decode(event["rarewrite.raw_base64.process.parent.executable"]) == EXE
    assert "\\xff" in doc["kibana"]["alert"]["reason"]


def test_every_output_writes_strict_utf8(tmp_path: Path) -> None:
    doc = alert(tmp_path)
    out = NdjsonOutput(str(tmp_path / "alerts.ndjson"))
    out.emit([doc])
    out.close()
    buf = io.StringIO()
    StdoutOutput(buf, fmt="summary").emit([doc])
    StdoutOutput(buf, fmt="json").emit([doc])
    for text in ((tmp_path / "alerts.ndjson").read_bytes().decode("utf-8"), buf.getvalue()):
        assert "\\udc" not in text.lower()  # no escaped lone surrogate either
        for line in text.splitlines():
            if line.startswith("{"):
                for s in strings(json.loads(line)):
                    s.encode("utf-8")


def test_visible_and_raw() -> None:
    assert visible(b"/ok/caf\xc3\xa9") == "/ok/café" and raw_base64(b"/ok/caf\xc3\xa9") is None
    assert visible(b"\xff") == "\\xff" and raw_base64(b"\xff") == "/w=="
    assert visible(None) is None and raw_base64(None) is None
