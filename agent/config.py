"""Layered INI configuration, parsed into frozen dataclasses.

Files are read the way fail2ban and systemd do it: ``NAME.conf`` (packaged,
never edited), then ``NAME.d/*.conf`` in sorted order; a later file wins key
by key. Every value goes through a tiny converter (supervisor's habit) that
raises ``ValueError`` with a clear message; the loader prefixes it with the
file, section and key, collects every problem and raises one ConfigError
listing them all. A sensor that silently watches the wrong thing is worse
than one that refuses to start, so nothing falls back to a default.
"""

from __future__ import annotations

import configparser
import glob
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, TypeVar
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.rule import Rule

T = TypeVar("T")

ETC = "/etc/rarewrite"
AGENT_CONF = os.path.join(ETC, "agent.conf")
COLLECTOR_CONF = os.path.join(ETC, "collector.conf")

# ------------------------------------------------------------- converters

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}
_SIZE = re.compile(r"\s*(\d+)\s*([KMG]i?B?|B)?\s*\Z", re.IGNORECASE)


def duration_ms(text: str) -> int:
    """``90s``, ``15m``, ``1h``, ``2d``, ``500ms``; a bare number is seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (use a number with ms, s, m, h or d, e.g. 90s, 1h)")
    ms = int(float(m.group(1)) * _UNIT_MS[m.group(2)])
    if ms <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return ms


def size_bytes(text: str) -> int:
    """``512``, ``64KiB``, ``8MiB``, ``1G``: powers of 1024."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 8MiB, 512KiB)")
    unit = (m.group(2) or "B").upper()[:1]
    return int(m.group(1)) * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


def integer(lo: int, hi: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range (allowed {lo} to {hi})")
        return value

    return convert


def boolean(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use yes or no)")


def choice(*allowed: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        t = text.strip()
        if t not in allowed:
            raise ValueError(f"{t!r} is not allowed (choose one of: {', '.join(allowed)})")
        return t

    return convert


def words(text: str) -> tuple[str, ...]:
    """One item a line (commas also separate); blank lines ignored."""
    return tuple(w.strip() for line in text.splitlines() for w in line.split(",") if w.strip())


def text(value: str) -> str:
    return value.strip()


def nonempty_words(text_: str) -> tuple[str, ...]:
    items = words(text_)
    if not items:
        raise ValueError("must list at least one item")
    return items


def abs_paths(text_: str) -> tuple[str, ...]:
    items = words(text_)
    bad = [p for p in items if not p.startswith("/")]
    if bad:
        raise ValueError(f"paths must be absolute: {', '.join(bad)}")
    return tuple(os.path.normpath(p) if p != "/" else p for p in items)


def nonempty_paths(text_: str) -> tuple[str, ...]:
    items = abs_paths(text_)
    if not items:
        raise ValueError("must list at least one absolute path")
    return items


def path(text_: str) -> str:
    t = text_.strip()
    if t and not t.startswith("/"):
        raise ValueError(f"{t!r} must be an absolute path")
    return t


def url(text_: str) -> str:
    t = text_.strip()
    if not t:
        return t
    parts = urlsplit(t)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{t!r} is not an http:// or https:// URL")
    return t.rstrip("/")


def agent_id(text_: str) -> str:
    """Empty (made on first start) or what the collector accepts as an id."""
    from agent.wire import valid_agent_id  # lazily: config stays free of msgpack

    t = text_.strip()
    if t and not valid_agent_id(t):
        raise ValueError(f"{t!r} is not an agent id (1-128 of A-Z a-z 0-9 . _ : @ -)")
    return t


def host_name(text_: str) -> str:
    """Empty (this host's name) or 1-255 printable characters."""
    t = text_.strip()
    if t and (len(t) > 255 or any(ord(ch) < 32 or ord(ch) == 127 for ch in t)):
        raise ValueError(f"{t!r} is not a host name (1-255 printable characters)")
    return t


def listen(text_: str) -> str:
    t = text_.strip()
    host, sep, port = t.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{t!r} is not HOST:PORT (e.g. 127.0.0.1:8787)")
    return t


# ------------------------------------------------------------- sections


@dataclass(frozen=True)
class AgentConfig:
    collector: str = ""
    state_dir: str = "/var/lib/rarewrite/agent"
    enrollment_secret_file: str = os.path.join(ETC, "enrollment.secret")
    agent_id: str = ""  # empty: a UUID made on first start, kept in the state dir
    host_name: str = ""  # empty: this host's name
    backend: str = "auto"
    watch: tuple[str, ...] = ("/",)
    exclude: tuple[str, ...] = ("/proc", "/sys", "/dev/pts", "/run/user")
    ca_bundle: str = ""  # empty: the system's trust store
    client_cert: str = ""
    client_key: str = ""
    ship_interval_ms: int = 1000
    batch_max_records: int = 5000
    outbox_max_records: int = 2_000_000
    request_timeout_ms: int = 30_000
    backoff_max_ms: int = 300_000
    file_facts: bool = True
    hash_max_bytes: int = 1 << 20
    log_level: str = "info"


@dataclass(frozen=True)
class CollectorConfig:
    listen: str = "127.0.0.1:8787"
    db: str = "/var/lib/rarewrite/collector/collector.db"
    enrollment_secret_file: str = os.path.join(ETC, "enrollment.secret")
    retention_ms: int = 4 * 3_600_000
    schedule: str = "hourly"
    settle_ms: int = 30_000
    alerts_file: str = ""
    alerts_stdout: bool = False
    max_body: int = 8 << 20
    read_timeout_ms: int = 30_000
    rate_limit: int = 200  # batches per agent per second, with a burst of the same
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    log_level: str = "info"


@dataclass(frozen=True)
class OutputConfig:
    """One ``[output.NAME]`` section: where alerts go besides the alerts file.

    ``options`` holds the converted values of that type's keys (see
    :data:`OUTPUT_KEYS`), defaults filled in.
    """

    name: str
    type: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    rule: Rule = field(default_factory=Rule)
    agent: AgentConfig = field(default_factory=AgentConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    outputs: tuple[OutputConfig, ...] = ()
    files: tuple[str, ...] = ()


# key -> (dataclass field, converter)
_Spec = Mapping[str, tuple[str, Callable[[str], Any]]]

RULE_KEYS: _Spec = {
    "name": ("name", text),
    "rule_id": ("rule_id", text),
    "description": ("description", text),
    "user_names": ("user_names", words),
    "user_ids": ("user_ids", words),
    "process_names": ("process_names", nonempty_words),
    "combinator": ("combinator", choice("and", "or")),
    "actions": ("actions", lambda t: _subset(t, ("creation", "rename"))),
    "strict_event_type": ("strict_event_type", boolean),
    "os_type": ("os_type", text),
    "window": ("window_ms", duration_ms),
    "count_below": ("count_below", integer(1, 1_000_000)),
    "agent_count": ("agent_count", integer(1, 1_000_000)),
    "limit": ("limit", integer(1, 100_000)),
    "schedule": ("schedule_ms", duration_ms),
    "severity": ("severity", choice("low", "medium", "high", "critical")),
    "risk_score": ("risk_score", integer(0, 100)),
    "tags": ("tags", words),
}

AGENT_KEYS: _Spec = {
    "collector": ("collector", url),
    "state_dir": ("state_dir", path),
    "enrollment_secret_file": ("enrollment_secret_file", path),
    "agent_id": ("agent_id", agent_id),
    "host_name": ("host_name", host_name),
    "backend": ("backend", choice("auto", "fanotify", "inotify")),
    "watch": ("watch", nonempty_paths),
    "exclude": ("exclude", abs_paths),
    "ca_bundle": ("ca_bundle", path),
    "client_cert": ("client_cert", path),
    "client_key": ("client_key", path),
    "ship_interval": ("ship_interval_ms", duration_ms),
    "batch_max_records": ("batch_max_records", integer(1, 20_000)),
    "outbox_max_records": ("outbox_max_records", integer(1000, 1_000_000_000)),
    "request_timeout": ("request_timeout_ms", duration_ms),
    "backoff_max": ("backoff_max_ms", duration_ms),
    "file_facts": ("file_facts", boolean),
    "hash_max_bytes": ("hash_max_bytes", size_bytes),
    "log_level": ("log_level", choice("debug", "info", "warning", "error")),
}

COLLECTOR_KEYS: _Spec = {
    "listen": ("listen", listen),
    "db": ("db", text),
    "enrollment_secret_file": ("enrollment_secret_file", path),
    "retention": ("retention_ms", duration_ms),
    "schedule": ("schedule", choice("hourly", "continuous")),
    "settle": ("settle_ms", duration_ms),
    "alerts_file": ("alerts_file", path),
    "alerts_stdout": ("alerts_stdout", boolean),
    "max_body": ("max_body", size_bytes),
    "read_timeout": ("read_timeout_ms", duration_ms),
    "rate_limit": ("rate_limit", integer(1, 1_000_000)),
    "tls_cert": ("tls_cert", path),
    "tls_key": ("tls_key", path),
    "tls_client_ca": ("tls_client_ca", path),
    "log_level": ("log_level", choice("debug", "info", "warning", "error")),
}

OUTPUT_TYPES = ("ndjson", "stdout", "webhook", "syslog")

SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}  # fmt: skip
_APP_NAME = re.compile(r"[!-~]{1,48}\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 token


def required_path(text_: str) -> str:
    t = path(text_)
    if not t:
        raise ValueError("must be an absolute path")
    return t


def required_url(text_: str) -> str:
    t = url(text_)
    if not t:
        raise ValueError("must be an http:// or https:// URL")
    return t


def header_name(text_: str) -> str:
    t = text_.strip()
    if not _HEADER_NAME.match(t):
        raise ValueError(f"{t!r} is not an HTTP header name (e.g. X-Rarewrite-Token)")
    return t


def app_name(text_: str) -> str:
    t = text_.strip()
    if not _APP_NAME.match(t):
        raise ValueError(f"{t!r} must be 1 to 48 printable ASCII characters without spaces")
    return t


def split_syslog_address(text_: str) -> tuple[str, str, int]:
    """``/dev/log`` -> ("unix", path, 0); ``udp://h:p`` / ``tcp://h:p`` -> (scheme, host, port)."""
    t = text_.strip()
    if t.startswith("/"):
        return "unix", t, 0
    scheme, sep, rest = t.partition("://")
    host, colon, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (
        scheme not in ("udp", "tcp")
        or not sep
        or not colon
        or not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        raise ValueError(f"{t!r} is not a unix socket path, udp://HOST:PORT or tcp://HOST:PORT")
    return scheme, host, int(port)


def syslog_address(text_: str) -> str:
    split_syslog_address(text_)
    return text_.strip()


REQUIRED = object()  # an output key without a default

# output type -> key -> (converter, default); the default is what build_outputs gets
OUTPUT_KEYS: Mapping[str, Mapping[str, tuple[Callable[[str], Any], Any]]] = {
    "ndjson": {
        "path": (required_path, REQUIRED),
        "max_bytes": (size_bytes, 100 << 20),
        "keep": (integer(1, 1000), 5),
    },
    "stdout": {"format": (choice("summary", "json"), "summary")},
    "webhook": {
        "url": (required_url, REQUIRED),
        "secret_header": (header_name, ""),
        "secret_file": (required_path, ""),
        "timeout": (duration_ms, 10_000),
        "queue_max": (integer(1, 10_000_000), 10_000),
        "backoff_max": (duration_ms, 60_000),
        "ca_bundle": (required_path, ""),
    },
    "syslog": {
        "address": (syslog_address, "/dev/log"),
        "facility": (choice(*SYSLOG_FACILITIES), "auth"),
        "app_name": (app_name, "rarewrite"),
        "timeout": (duration_ms, 5_000),
        "queue_max": (integer(1, 10_000_000), 10_000),
        "backoff_max": (duration_ms, 30_000),
    },
}
_OUTPUT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


def _subset(text_: str, allowed: Sequence[str]) -> tuple[str, ...]:
    items = nonempty_words(text_)
    bad = [i for i in items if i not in allowed]
    if bad:
        raise ValueError(f"{', '.join(bad)} not allowed (choose from: {', '.join(allowed)})")
    return items


# ------------------------------------------------------------- loading


def layered_files(main: str) -> list[str]:
    """``X.conf`` then ``X.d/*.conf`` sorted (fail2ban's order)."""
    base = main[:-5] if main.endswith(".conf") else main
    return [main, *sorted(glob.glob(os.path.join(glob.escape(base + ".d"), "*.conf")))]


def load(
    main_files: Iterable[str],
    required: bool = True,
    overrides: Optional[Mapping[str, Mapping[str, str]]] = None,
) -> Config:
    """Read the layered files behind each of ``main_files`` plus command-line
    ``overrides`` ({section: {key: raw value}}); raise ConfigError with every
    problem. A missing main file is an error only when ``required``."""
    problems: list[str] = []
    # (section, key) -> (raw value, where it came from)
    raw: dict[str, dict[str, tuple[str, str]]] = {}
    read: list[str] = []
    for main in main_files:
        if not os.path.exists(main):
            if required:
                problems.append(f"{main}: no such file")
            continue
        for fname in layered_files(main):
            parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
            parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
            try:
                with open(fname, encoding="utf-8") as f:
                    parser.read_file(f, fname)
            except (OSError, UnicodeDecodeError, configparser.Error) as e:
                problems.append(f"{fname}: {_one_line(e)}")
                continue
            read.append(fname)
            for section in parser.sections():
                for key, value in parser.items(section, raw=True):
                    raw.setdefault(section, {})[key] = (value, f"{fname}: [{section}] {key}")
    for section, keys in (overrides or {}).items():
        for key, value in keys.items():
            raw.setdefault(section, {})[key] = (value, f"command line: [{section}] {key}")

    rule = _build(Rule(), RULE_KEYS, raw.pop("rule", {}), problems)
    agent = _build(AgentConfig(), AGENT_KEYS, raw.pop("agent", {}), problems)
    collector = _build(CollectorConfig(), COLLECTOR_KEYS, raw.pop("collector", {}), problems)
    outputs = []
    for section in sorted(raw):
        entries = raw[section]
        if section.startswith("output."):
            outputs.append(_output(section, entries, problems))
        else:
            where = next(iter(entries.values()))[1].split(":")[0] if entries else ""
            problems.append(
                f"{where}: [{section}] is not a known section (rule, agent, collector, output.NAME)"
            )
    problems.extend(_cross_checks(rule, agent, collector))
    if problems:
        raise ConfigError(problems)
    return Config(rule, agent, collector, tuple(outputs), tuple(read))


def _output(section: str, entries: Mapping[str, tuple[str, str]], problems: list[str]) -> OutputConfig:
    """One ``[output.NAME]`` section: its type's keys converted, defaults filled in."""
    name = section[len("output.") :]
    first = next(iter(entries.values()))[1] if entries else f"[{section}]"
    file_part = first.rsplit(": [", 1)[0] + ": " if ": [" in first else ""
    if not _OUTPUT_NAME.match(name):
        problems.append(f"{file_part}[{section}]: the output name must be 1 to 64 of A-Z a-z 0-9 _ . -")
    kind = entries.get("type", ("", ""))[0].strip()
    if kind not in OUTPUT_TYPES:
        where = entries["type"][1] if "type" in entries else f"{file_part}[{section}] type"
        problems.append(f"{where}: {kind!r} is not an output type (choose one of: {', '.join(OUTPUT_TYPES)})")
        return OutputConfig(name, kind, {})
    spec = OUTPUT_KEYS[kind]
    opts: dict[str, Any] = {}
    for key, (value, where) in entries.items():
        if key == "type":
            continue
        if key not in spec:
            known = ", ".join(["type", *sorted(spec)])
            problems.append(f"{where}: unknown key for type = {kind} (known keys: {known})")
            continue
        try:
            opts[key] = spec[key][0](value)
        except ValueError as e:
            problems.append(f"{where}: {e}")
    for key, (_, default) in spec.items():
        if key in opts:
            continue
        if default is REQUIRED:
            if key not in entries:  # present but bad: already reported
                problems.append(f"{file_part}[{section}] {key}: missing (required for type = {kind})")
        else:
            opts[key] = default
    if kind == "webhook" and bool(opts.get("secret_header")) != bool(opts.get("secret_file")):
        problems.append(f"{file_part}[{section}] secret_header and secret_file: give both or neither")
    return OutputConfig(name, kind, opts)


def _build(default: T, spec: _Spec, keys: Mapping[str, tuple[str, str]], problems: list[str]) -> T:
    changes: dict[str, Any] = {}
    for key, (value, where) in keys.items():
        if key not in spec:
            known = ", ".join(sorted(spec))
            problems.append(f"{where}: unknown key (known keys: {known})")
            continue
        attr, convert = spec[key]
        try:
            changes[attr] = convert(value)
        except ValueError as e:
            problems.append(f"{where}: {e}")
    return replace(default, **changes)  # type: ignore[type-var]


def _cross_checks(rule: Rule, agent: AgentConfig, collector: CollectorConfig) -> list[str]:
    problems = []
    if collector.retention_ms <= rule.window_ms:
        problems.append(
            "[collector] retention: must be longer than [rule] window "
            f"({collector.retention_ms // 1000}s <= {rule.window_ms // 1000}s), or evaluate cannot be exact"
        )
    if bool(collector.tls_cert) != bool(collector.tls_key):
        problems.append("[collector] tls_cert and tls_key: give both or neither")
    if bool(agent.client_cert) != bool(agent.client_key):
        problems.append("[agent] client_cert and client_key: give both or neither")
    if not rule.user_names and not rule.user_ids and rule.combinator == "and":
        problems.append("[rule] user_names and user_ids: both empty, so nothing can ever match")
    return problems


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def describe(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data, for ``config check``."""

    def plain(obj: Any) -> Any:
        if hasattr(obj, "__dataclass_fields__"):
            return {f.name: plain(getattr(obj, f.name)) for f in fields(obj) if not f.name.startswith("_")}
        if isinstance(obj, (tuple, list)):
            return [plain(x) for x in obj]
        if isinstance(obj, Mapping):
            return {k: plain(v) for k, v in obj.items()}
        return obj

    from agent.collector.store import redact  # a database URL may carry a password

    safe = replace(cfg, files=(), collector=replace(cfg.collector, db=redact(cfg.collector.db)))
    return {"files": list(cfg.files), **plain(safe)}
