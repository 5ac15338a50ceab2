"""Where alerts go: one small interface and four outputs.

- :class:`NdjsonOutput`: one JSON document a line, fsync per batch, rotated
  to ``path.1`` ... ``path.keep`` before a write would pass ``max_bytes``.
- :class:`StdoutOutput`: a readable one-line summary, or the full JSON.
- :class:`WebhookOutput`: one JSON alert per HTTP POST, with a secret header.
- :class:`SyslogOutput`: RFC 5424 to a unix datagram socket, UDP, or TCP
  (octet-counting framing, RFC 6587).

The network outputs never block the schedule: ``emit`` puts the alerts on a
bounded in-memory queue that a background thread drains, retrying with
exponential backoff and jitter; when the queue is full the oldest waiting
alert is dropped and counted (``dropped``). ``close`` gives the thread a few
seconds to deliver what is left and says how many alerts it could not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from agent.collector.outputs.base import Dropping, Output
from agent.collector.outputs.ndjson import NdjsonOutput
from agent.collector.outputs.stdout import StdoutOutput
from agent.collector.outputs.syslog import SyslogOutput
from agent.collector.outputs.webhook import WebhookOutput
from agent.shared.config.schema import OUTPUT_KEYS, REQUIRED, Config
from agent.shared.text import url_for_logs

log = logging.getLogger("rarewrite.collector.outputs")


def _opts(kind: str, options: Any) -> dict[str, Any]:
    """An output section's options with the defaults filled in (config.load
    already does; this covers an OutputConfig made by hand)."""
    out = dict(options)
    for key, (convert, default) in OUTPUT_KEYS[kind].items():
        if key not in out:
            if default is not REQUIRED:
                out[key] = default
        elif isinstance(out[key], str) and out[key] != default:
            out[key] = convert(out[key])  # converters take their own output back unchanged
    return out


def read_secret(path: str) -> str:
    """The webhook secret: the file's first line, stripped; OSError if unusable."""
    with open(path, encoding="utf-8") as f:
        secret = f.readline().strip()
    if not secret:
        raise OSError(f"{path}: the webhook secret file is empty")
    return secret


def build_one(name: str, kind: str, options: Any) -> Output:
    o = _opts(kind, options)
    if kind == "ndjson":
        return NdjsonOutput(o["path"], name, o["max_bytes"], o["keep"])
    if kind == "stdout":
        return StdoutOutput(name=name, fmt=o["format"])
    if kind == "webhook":
        secret = read_secret(o["secret_file"]) if o["secret_file"] else ""
        return WebhookOutput(
            o["url"],
            name,
            o["secret_header"],
            secret,
            o["timeout"] / 1000.0,
            o["queue_max"],
            o["backoff_max"] / 1000.0,
            o["ca_bundle"],
        )
    if kind == "syslog":
        return SyslogOutput(
            o["address"],
            name,
            o["facility"],
            o["app_name"],
            o["timeout"] / 1000.0,
            o["queue_max"],
            o["backoff_max"] / 1000.0,
            o["max_message"],
        )
    raise ValueError(f"{kind!r} is not an output type")


def build_outputs(cfg: Config) -> list[Output]:
    """The outputs the config asks for; raises OSError if one cannot be made
    (a file that cannot be opened, an unreadable secret): none is left running."""
    outs: list[Output] = []
    try:
        if cfg.collector.alerts_file:
            outs.append(NdjsonOutput(cfg.collector.alerts_file, "alerts_file"))
        if cfg.collector.alerts_stdout:
            outs.append(StdoutOutput())
        for o in cfg.outputs:
            try:
                outs.append(build_one(o.name, o.type, o.options))
            except (OSError, ValueError, KeyError) as e:
                raise OSError(f"[output.{o.name}]: {e}") from e
    except OSError:
        for out in outs:
            out.close()
        raise
    for out in outs:
        log.info("event=output_ready output=%r %s", out.name, _describe(out))
    return outs


def _describe(out: Output) -> str:
    if isinstance(out, NdjsonOutput):
        return f"type=ndjson path={out.path!r} max_bytes={out.max_bytes} keep={out.keep}"
    if isinstance(out, WebhookOutput):
        return f"type=webhook url={url_for_logs(out.url)!r} queue_max={out.queue_max}"
    if isinstance(out, SyslogOutput):
        return f"type=syslog address={out.address!r} facility={out.facility}"
    return f"type={type(out).__name__}"


def emit_all(outputs: Sequence[Output], alerts: Sequence[dict[str, Any]]) -> None:
    """Give every output the batch; one failing output does not stop the others."""
    for out in outputs:
        try:
            out.emit(alerts)
        except OSError as e:
            log.error("event=output_failed output=%r alerts=%d error=%r", out.name, len(alerts), str(e))


def dropped_counts(outputs: Sequence[Output]) -> dict[str, int]:
    """output name -> alerts dropped by a full queue, for /metrics
    (``rarewrite_collector_output_dropped_total{output=...}``)."""
    return {out.name: out.dropped for out in outputs if isinstance(out, Dropping)}
