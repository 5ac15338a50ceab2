"""The configuration's shape: one frozen dataclass per section, and for each
section the keys admins write, the field each sets and its converter."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, Union

from agent.shared.config.converters import (
    abs_paths,
    access_log_specs,
    agent_id,
    app_name,
    boolean,
    choice,
    duration_ms,
    header_name,
    host_name,
    integer,
    listen,
    nonempty_paths,
    nonempty_words,
    path,
    required_path,
    required_url,
    size_between,
    size_bytes,
    subset,
    syslog_address,
    text,
    url,
    web_root_specs,
    words,
)
from agent.shared.rule import Rule
from agent.shared.rules import NewTermsRule, OutbreakRule, default_rules

ETC = "/etc/rarewrite"
AGENT_CONF = os.path.join(ETC, "agent.conf")
COLLECTOR_CONF = os.path.join(ETC, "collector.conf")


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
    proxy: str = ""  # empty: straight to the collector (environment proxies are never used)
    allow_plain_http: bool = False  # http:// to a collector on another host is refused unless yes
    ship_interval_ms: int = 1000
    heartbeat_interval_ms: int = 30_000  # the longest the agent stays quiet, even idle
    flood_mute_rate: int = 5000  # fanotify: a directory past this many events a second is muted (0: never)
    batch_max_records: int = 5000
    outbox_max_records: int = 2_000_000
    request_timeout_ms: int = 30_000
    backoff_max_ms: int = 300_000
    file_facts: bool = True
    hash_max_bytes: int = 1 << 20
    log_level: str = "info"


@dataclass(frozen=True)
class EnrichConfig:
    """``[enrich]``: what the agent adds to an event that may become an alert
    (read on the host, 1 s after the write), and the opt-in response."""

    enabled: bool = True
    packages: bool = True  # dpkg/rpm ownership, and whether the file differs from the packaged one
    web_roots: tuple[str, ...] = ("auto",)  # "auto": from the server configs; or DIR[:EXTS][@URL]
    server_configs: tuple[str, ...] = (
        "/etc/nginx/nginx.conf", "/etc/apache2/apache2.conf", "/etc/httpd/conf/httpd.conf",
    )  # fmt: skip
    access_logs: tuple[tuple[str, str], ...] = (("auto", ""),)  # (path, format); "auto": the configs' logs
    request_window_ms: int = 5000  # requests this close to the write are its candidates
    followup_ms: int = 600_000  # requests for the new file this long after it are follow-ups
    content: bool = True
    content_max_bytes: int = 1 << 20  # larger files are not scanned
    content_rate: int = 20  # files scanned a second at most
    yara_rules: str = ""  # a directory of .yar files (needs python3-yara); empty: none
    quarantine_dir: str = "/var/lib/rarewrite/agent/quarantine"
    quarantine_stub: bool = False  # leave an empty, mode-000 file where a quarantined one was


@dataclass(frozen=True)
class CollectorConfig:
    listen: str = "127.0.0.1:8787"
    db: str = "/var/lib/rarewrite/collector/collector.db"
    enrollment_secret_file: str = os.path.join(ETC, "enrollment.secret")
    retention_ms: int = 4 * 3_600_000
    schedule: str = "hourly"
    settle_ms: int = 30_000
    grace_ms: int = 60_000  # the hourly run for T waits this after T for events on their way
    alerts_file: str = ""
    alerts_stdout: bool = False
    max_body: int = 8 << 20
    read_timeout_ms: int = 30_000
    header_timeout_ms: int = 10_000
    idle_timeout_ms: int = 75_000
    max_connections: int = 10_000
    max_connections_per_peer: int = 1_000
    rate_limit: int = 200  # batches per agent per second, with a burst of the same
    agent_silent_after_ms: int = 120_000  # an agent unheard this long raises an agent_silent alert
    health_alerts: bool = True  # sensor-health alerts (silent, loss, enrollments) to the outputs
    enroll_with_secret: bool = True  # no: only per-host tokens (collector tokens create) enroll
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
    rule: Rule = field(default_factory=Rule)  # the first rule, [rule]
    rules: tuple[Union[NewTermsRule, OutbreakRule], ...] = field(default_factory=default_rules)  # [rule.KEY]
    agent: AgentConfig = field(default_factory=AgentConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    enrich: EnrichConfig = field(default_factory=EnrichConfig)
    outputs: tuple[OutputConfig, ...] = ()
    files: tuple[str, ...] = ()


# What suppression may group by: the fields of a row (an alert's own fields)
SUPPRESS_FIELDS = (
    "host.name", "agent.id", "process.executable", "file.path", "file.name", "file.directory",
    "file.extension",
)  # fmt: skip


# key -> (dataclass field, converter)
Spec = Mapping[str, tuple[str, Callable[[str], Any]]]
T = TypeVar("T")


def build_section(
    default: T,
    spec: Spec,
    keys: Mapping[str, tuple[str, str]],
    problems: list[str],
    known: str = "known keys",
) -> T:
    """``default`` with each key of a section converted by ``spec``; every
    unknown key and bad value goes into ``problems`` (``known`` names the list
    of keys offered instead)."""
    changes: dict[str, Any] = {}
    for key, (value, where) in keys.items():
        if key not in spec:
            problems.append(f"{where}: unknown key ({known}: {', '.join(sorted(spec))})")
            continue
        attr, convert = spec[key]
        try:
            changes[attr] = convert(value)
        except ValueError as e:
            problems.append(f"{where}: {e}")
    return replace(default, **changes)  # type: ignore[type-var]


RULE_KEYS: Spec = {
    "enabled": ("enabled", boolean),
    "name": ("name", text),
    "rule_id": ("rule_id", text),
    "description": ("description", text),
    "user_names": ("user_names", words),
    "user_ids": ("user_ids", words),
    "process_names": ("process_names", nonempty_words),
    "combinator": ("combinator", choice("and", "or")),
    "actions": ("actions", lambda t: subset(t, ("creation", "rename"))),
    "strict_event_type": ("strict_event_type", boolean),
    "os_type": ("os_type", text),
    "window": ("window_ms", duration_ms),
    "count_below": ("count_below", integer(1, 1_000_000)),
    "agent_count": ("agent_count", integer(1, 1_000_000)),
    "limit": ("limit", integer(1, 100_000)),
    "schedule": ("schedule_ms", duration_ms),
    "severity": ("severity", choice("low", "medium", "high", "critical")),
    "building_block": ("building_block", boolean),
    "risk_score": ("risk_score", integer(0, 100)),
    "tags": ("tags", words),
    # "exceptions" (names of lists and [exception.NAME] sections) is resolved by the loader
    "suppress_by": ("suppress_by", lambda t: subset(t, SUPPRESS_FIELDS) if words(t) else ()),
    "suppress_for": ("suppress_for_ms", duration_ms),
    "suppress_missing": ("suppress_missing", choice("suppress", "do_not_suppress")),
    "quarantine": ("quarantine", boolean),
}


AGENT_KEYS: Spec = {
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
    "proxy": ("proxy", url),
    "allow_plain_http": ("allow_plain_http", boolean),
    "ship_interval": ("ship_interval_ms", duration_ms),
    "heartbeat_interval": ("heartbeat_interval_ms", duration_ms),
    "flood_mute_rate": ("flood_mute_rate", integer(0, 10_000_000)),
    "batch_max_records": ("batch_max_records", integer(1, 20_000)),
    "outbox_max_records": ("outbox_max_records", integer(1000, 1_000_000_000)),
    "request_timeout": ("request_timeout_ms", duration_ms),
    "backoff_max": ("backoff_max_ms", duration_ms),
    "file_facts": ("file_facts", boolean),
    "hash_max_bytes": ("hash_max_bytes", size_bytes),
    "log_level": ("log_level", choice("debug", "info", "warning", "error")),
}


ENRICH_KEYS: Spec = {
    "enabled": ("enabled", boolean),
    "packages": ("packages", boolean),
    "web_roots": ("web_roots", web_root_specs),
    "server_configs": ("server_configs", abs_paths),
    "access_logs": ("access_logs", access_log_specs),
    "request_window": ("request_window_ms", duration_ms),
    "followup": ("followup_ms", duration_ms),
    "content": ("content", boolean),
    "content_max_bytes": ("content_max_bytes", size_between(1024, 64 << 20)),
    "content_rate": ("content_rate", integer(1, 10_000)),
    "yara_rules": ("yara_rules", path),
    "quarantine_dir": ("quarantine_dir", required_path),
    "quarantine_stub": ("quarantine_stub", boolean),
}


COLLECTOR_KEYS: Spec = {
    "listen": ("listen", listen),
    "db": ("db", text),
    "enrollment_secret_file": ("enrollment_secret_file", path),
    "retention": ("retention_ms", duration_ms),
    "schedule": ("schedule", choice("hourly", "continuous")),
    "settle": ("settle_ms", duration_ms),
    "grace": ("grace_ms", duration_ms),
    "alerts_file": ("alerts_file", path),
    "alerts_stdout": ("alerts_stdout", boolean),
    "max_body": ("max_body", size_bytes),
    "read_timeout": ("read_timeout_ms", duration_ms),
    "header_timeout": ("header_timeout_ms", duration_ms),
    "idle_timeout": ("idle_timeout_ms", duration_ms),
    "max_connections": ("max_connections", integer(16, 1_000_000)),
    "max_connections_per_peer": ("max_connections_per_peer", integer(1, 1_000_000)),
    "rate_limit": ("rate_limit", integer(1, 1_000_000)),
    "agent_silent_after": ("agent_silent_after_ms", duration_ms),
    "health_alerts": ("health_alerts", boolean),
    "enroll_with_secret": ("enroll_with_secret", boolean),
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
        "allow_plain_http": (boolean, False),
    },
    "syslog": {
        "address": (syslog_address, "/dev/log"),
        "facility": (choice(*SYSLOG_FACILITIES), "auth"),
        "app_name": (app_name, "rarewrite"),
        "timeout": (duration_ms, 5_000),
        "queue_max": (integer(1, 10_000_000), 10_000),
        "backoff_max": (duration_ms, 30_000),
        "max_message": (size_between(1024, 1 << 20), 8192),
    },
}
