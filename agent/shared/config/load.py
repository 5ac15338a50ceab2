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
import time
from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from typing import Any, Optional

from agent.shared.config.converters import plain_http_elsewhere, words
from agent.shared.config.exception_sections import PREFIX, exception_section, file_part, resolve
from agent.shared.config.rule_sections import rule_sections
from agent.shared.config.schema import (
    AGENT_KEYS,
    COLLECTOR_KEYS,
    ENRICH_KEYS,
    OUTPUT_KEYS,
    OUTPUT_TYPES,
    REQUIRED,
    RULE_KEYS,
    AgentConfig,
    CollectorConfig,
    Config,
    EnrichConfig,
    OutputConfig,
    build_section,
)
from agent.shared.errors import ConfigError
from agent.shared.rule import Rule
from agent.shared.text import url_for_logs

_OUTPUT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


def layered_files(main: str) -> list[str]:
    """``X.conf`` then ``X.d/*.conf`` sorted (fail2ban's order)."""
    base = main[:-5] if main.endswith(".conf") else main
    return [main, *sorted(glob.glob(os.path.join(glob.escape(base + ".d"), "*.conf")))]


def load(
    main_files: Iterable[str],
    required: bool = True,
    overrides: Optional[Mapping[str, Mapping[str, str]]] = None,
    strict_expiry: bool = False,
    now_ms: Optional[int] = None,
) -> Config:
    """Read the layered files behind each of ``main_files`` plus command-line
    ``overrides`` ({section: {key: raw value}}); raise ConfigError with every
    problem. A missing main file is an error only when ``required``.

    An exception whose ``expires`` has passed is an error when
    ``strict_expiry`` (``config check``); a running collector only stops
    applying it (an unattended restart must not fail on a date)."""
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

    rule = _rule(raw, problems, now_ms, strict_expiry)
    rules = rule_sections(raw, rule.rule_id, problems)
    agent = build_section(AgentConfig(), AGENT_KEYS, raw.pop("agent", {}), problems)
    collector = build_section(CollectorConfig(), COLLECTOR_KEYS, raw.pop("collector", {}), problems)
    enrich = build_section(EnrichConfig(), ENRICH_KEYS, raw.pop("enrich", {}), problems)
    outputs = []
    for section in sorted(raw):
        entries = raw[section]
        if section.startswith("output."):
            outputs.append(_output(section, entries, problems))
        else:
            where = next(iter(entries.values()))[1].split(":")[0] if entries else ""
            problems.append(
                f"{where}: [{section}] is not a known section "
                "(rule, rule.KEY, agent, collector, enrich, output.NAME, exception.NAME)"
            )
    problems.extend(_cross_checks(rule, agent, collector))
    if problems:
        raise ConfigError(problems)
    return Config(rule, rules, agent, collector, enrich, tuple(outputs), tuple(read))


def _rule(
    raw: dict[str, dict[str, tuple[str, str]]],
    problems: list[str],
    now_ms: Optional[int],
    strict_expiry: bool,
) -> Rule:
    """The ``[rule]`` section, with the exceptions its ``exceptions`` names;
    the ``[exception.NAME]`` sections are taken out of ``raw``."""
    keys = dict(raw.pop("rule", {}))
    wanted = keys.pop("exceptions", None)
    rule = build_section(Rule(), RULE_KEYS, keys, problems)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    own = {
        section[len(PREFIX) :]: exception_section(section, raw.pop(section), problems, now, strict_expiry)
        for section in sorted(raw)
        if section.startswith(PREFIX)
    }
    if wanted is None:
        return rule
    names = words(wanted[0])
    if not names or ("none" in names and len(names) > 1):
        problems.append(f"{wanted[1]}: list exception names, or none alone")
        return rule
    return replace(rule, exceptions=resolve(names, own, wanted[1], problems))


def _output(section: str, entries: Mapping[str, tuple[str, str]], problems: list[str]) -> OutputConfig:
    """One ``[output.NAME]`` section: its type's keys converted, defaults filled in."""
    name = section[len("output.") :]
    prefix = file_part(section, entries)
    if not _OUTPUT_NAME.match(name):
        problems.append(f"{prefix}[{section}]: the output name must be 1 to 64 of A-Z a-z 0-9 _ . -")
    kind = entries.get("type", ("", ""))[0].strip()
    if kind not in OUTPUT_TYPES:
        where = entries["type"][1] if "type" in entries else f"{prefix}[{section}] type"
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
                problems.append(f"{prefix}[{section}] {key}: missing (required for type = {kind})")
        else:
            opts[key] = default
    if kind == "webhook" and plain_http_elsewhere(opts.get("url", "")) and not opts.get("allow_plain_http"):
        problems.append(
            f"{prefix}[{section}] url: {url_for_logs(opts['url'])} is plain http:// to another host "
            "(alerts and the secret header in clear): use https://, or set allow_plain_http = yes"
        )
    if kind == "webhook" and bool(opts.get("secret_header")) != bool(opts.get("secret_file")):
        problems.append(f"{prefix}[{section}] secret_header and secret_file: give both or neither")
    return OutputConfig(name, kind, opts)


def _cross_checks(rule: Rule, agent: AgentConfig, collector: CollectorConfig) -> list[str]:
    problems = []
    if collector.retention_ms <= rule.window_ms:
        problems.append(
            "[collector] retention: must be longer than [rule] window "
            f"({collector.retention_ms // 1000}s <= {rule.window_ms // 1000}s), or evaluate cannot be exact"
        )
    if bool(collector.tls_cert) != bool(collector.tls_key):
        problems.append("[collector] tls_cert and tls_key: give both or neither")
    if agent.collector and plain_http_elsewhere(agent.collector) and not agent.allow_plain_http:
        problems.append(
            f"[agent] collector: {url_for_logs(agent.collector)} is plain http:// to another host "
            "(keys and events in clear): use https://, or set allow_plain_http = yes"
        )
    if bool(agent.client_cert) != bool(agent.client_key):
        problems.append("[agent] client_cert and client_key: give both or neither")
    if not 1000 <= agent.heartbeat_interval_ms <= 3_600_000:
        problems.append("[agent] heartbeat_interval: must be between 1s and 1h")
    if collector.agent_silent_after_ms < 10_000:
        problems.append("[collector] agent_silent_after: must be at least 10s (agents beat every 30s)")
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

    from agent.shared.text import redact, redact_url  # a database or proxy URL may carry a password

    safe = replace(
        cfg,
        files=(),
        agent=replace(
            cfg.agent, proxy=redact_url(cfg.agent.proxy), collector=url_for_logs(cfg.agent.collector)
        ),
        collector=replace(cfg.collector, db=redact(cfg.collector.db)),
        outputs=tuple(
            replace(o, options={**o.options, "url": url_for_logs(o.options["url"])})
            if "url" in o.options
            else o
            for o in cfg.outputs
        ),
    )
    return {"files": list(cfg.files), **plain(safe)}
