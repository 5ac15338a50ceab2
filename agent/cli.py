"""The ``rarewrite`` command: parse, load config, call one entry point.

The command line is a contract: tests and operators script against it.
Every option also has a config key; command-line values are validated
exactly like config values, and every problem is listed at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from agent import __version__
from agent.shared.config.load import describe, load
from agent.shared.config.schema import AGENT_CONF, COLLECTOR_CONF, Config
from agent.shared.errors import ConfigError, EnrollError, RarewriteError

SECRET_ENV = "RAREWRITE_ENROLLMENT_SECRET"  # noqa: S105 - a variable name, not a secret
EXIT_CONFIG = 2
EXIT_ERROR = 1
_DB_HELP = (
    "the collector's SQLite file, or postgresql://USER@HOST:PORT/DB "
    "(password from PGPASSWORD or PGPASSFILE, not the command line)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rarewrite",
        description="Catch a web server writing a file that no other server in the fleet writes.",
    )
    p.add_argument("--version", action="version", version=f"rarewrite {__version__}")
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="overrides [*] log_level"
    )
    top = p.add_subparsers(dest="group", metavar="{collector,agent,config}", required=True)
    _collector_commands(top.add_parser("collector", help="the central collector"))
    _agent_commands(top.add_parser("agent", help="the on-host agent"))
    cf = top.add_parser("config", help="configuration").add_subparsers(dest="cmd", required=True)
    chk = cf.add_parser("check", help="validate config files; print every error, or the effective config")
    chk.add_argument(
        "--config",
        metavar="FILE",
        action="append",
        help=f"file to check with its .d/ overrides (repeatable; default {AGENT_CONF} and {COLLECTOR_CONF})",
    )
    return p


def _collector_commands(group: argparse.ArgumentParser) -> None:
    col = group.add_subparsers(dest="cmd", required=True)
    serve = col.add_parser(
        "serve", help="accept agents' batches over HTTP(S), evaluate the rule, write alerts"
    )
    _config_opt(serve, COLLECTOR_CONF)
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to serve on ([collector] listen)")
    serve.add_argument("--db", metavar="PATH|URL", help=_DB_HELP + " ([collector] db)")
    _secret_opts(serve)
    serve.add_argument(
        "--schedule", choices=("hourly", "continuous"), help="when the rule runs ([collector] schedule)"
    )
    serve.add_argument(
        "--settle", metavar="DURATION", help="continuous: how long a pair must stay rare ([collector] settle)"
    )
    serve.add_argument(
        "--alerts-file", metavar="PATH", help="append alerts as NDJSON here ([collector] alerts_file)"
    )
    serve.add_argument(
        "--retention", metavar="DURATION", help="keep events this long ([collector] retention)"
    )

    ev = col.add_parser("evaluate", help="print the rule's rows at a time T as NDJSON")
    _config_opt(ev, COLLECTOR_CONF)
    ev.add_argument("--db", metavar="PATH|URL", required=True, help=_DB_HELP)
    ev.add_argument(
        "--at", metavar="ISO8601", required=True, help="evaluation time T; the window is (T-1h, T]"
    )
    ev.add_argument(
        "--rule",
        metavar="NAME",
        help="the rule (its [rule.KEY] key, rule id or name; default: the first rule, [rule]): "
        "via-web-server prints its new events of (T - lookback, T], outbreak its rows at T",
    )

    _fleet_commands(col)

    alerts = col.add_parser("alerts", help="list stored alerts")
    _config_opt(alerts, COLLECTOR_CONF)
    alerts.add_argument("--db", metavar="PATH|URL", help=_DB_HELP + " ([collector] db)")
    alerts.add_argument("--since", metavar="ISO8601", help="only alerts at or after this time")
    alerts.add_argument("--json", action="store_true", help="full ECS documents instead of one line each")
    alerts.add_argument(
        "--rule",
        metavar="RULE_ID",
        help="only this rule's alerts (rarewrite-sensor-health: the sensors' health)",
    )

    mig = col.add_parser("migrate", help="create or upgrade the collector's database schema, then exit")
    _config_opt(mig, COLLECTOR_CONF)
    mig.add_argument("--db", metavar="PATH|URL", help=_DB_HELP + " ([collector] db)")


def _fleet_commands(col: Any) -> None:
    """``collector agents`` and ``collector tokens``."""
    agents = col.add_parser(
        "agents",
        help="list enrolled agents and their health, revoke one, or reset one so it may enroll again",
    )
    _config_opt(agents, COLLECTOR_CONF)
    agents.add_argument("action", choices=("list", "revoke", "reset", "restore"))
    agents.add_argument(
        "agent_id", nargs="?", help="the agent to revoke, or to let enroll again with the secret (reset)"
    )
    agents.add_argument("--db", metavar="PATH|URL", help=_DB_HELP + " ([collector] db)")

    tokens = col.add_parser("tokens", help="per-host enrollment tokens: create one, list them, revoke one")
    _config_opt(tokens, COLLECTOR_CONF)
    tokens.add_argument("action", choices=("create", "list", "revoke"))
    tokens.add_argument("token_id", nargs="?", help="the token to revoke (its id, as list shows it)")
    tokens.add_argument(
        "--agent-id", metavar="ID", help="the only agent id the token enrolls (and may re-key)"
    )
    tokens.add_argument("--uses", type=int, default=1, help="enrollments the token allows (default 1)")
    tokens.add_argument("--expires", metavar="DURATION", default="24h", help="valid for this long (24h)")
    tokens.add_argument("--comment", default="", help="a note kept with the token")
    tokens.add_argument("--db", metavar="PATH|URL", help=_DB_HELP + " ([collector] db)")


def _agent_commands(group: argparse.ArgumentParser) -> None:
    ag = group.add_subparsers(dest="cmd", required=True)
    run = ag.add_parser("run", help="watch this host and ship matching writes to the collector")
    _config_opt(run, AGENT_CONF)
    _agent_opts(run)
    run.add_argument(
        "--watch",
        metavar="PATH",
        action="append",
        help="watch this path (repeatable; replaces [agent] watch)",
    )
    run.add_argument(
        "--exclude",
        metavar="PATH",
        action="append",
        help="skip this path (repeatable; replaces [agent] exclude)",
    )
    run.add_argument(
        "--backend", choices=("auto", "fanotify", "inotify"), help="event source ([agent] backend)"
    )

    rp = ag.add_parser(
        "replay", help="send recorded ECS events (NDJSON) through the agent; exit 0 once acknowledged"
    )
    _config_opt(rp, AGENT_CONF)
    rp.add_argument("--events", metavar="FILE", required=True, help="ECS documents, one JSON object a line")
    _agent_opts(rp)

    st = ag.add_parser("status", help="print the running agent's status as JSON (exit 0 while it watches)")
    st.add_argument("--state-dir", metavar="DIR", required=True)

    qd = ag.add_parser("quarantined", help="list the files the agent quarantined (one JSON object a line)")
    _config_opt(qd, AGENT_CONF)
    rs = ag.add_parser("restore", help="put a quarantined file back, with its owner, mode and times")
    _config_opt(rs, AGENT_CONF)
    rs.add_argument("qid", help="the quarantine id (rarewrite agent quarantined)")
    rs.add_argument("--force", action="store_true", help="replace the empty stub left in the file's place")


def _config_opt(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"config file, read with FILE's .d/*.conf overrides (default {default}, if present)",
    )


def _secret_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--enrollment-secret",
        metavar="S",
        help=f"shared enrollment secret (visible in ps: prefer ${SECRET_ENV} or the secret file)",
    )
    p.add_argument("--enrollment-secret-file", metavar="PATH", help="read the secret from this file")


def _agent_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collector", metavar="URL", help="collector base URL ([agent] collector)")
    p.add_argument("--state-dir", metavar="DIR", help="state folder ([agent] state_dir)")
    _secret_opts(p)
    p.add_argument("--agent-id", metavar="ID", help="force the agent id ([agent] agent_id)")
    p.add_argument("--host-name", metavar="NAME", help="force the host name ([agent] host_name)")


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    section = "collector" if args.group == "collector" else "agent"
    mapping = {
        "listen": "listen", "db": "db", "schedule": "schedule", "settle": "settle",
        "alerts_file": "alerts_file", "retention": "retention", "collector": "collector",
        "state_dir": "state_dir", "agent_id": "agent_id", "host_name": "host_name", "backend": "backend",
        "enrollment_secret_file": "enrollment_secret_file",
    }  # fmt: skip
    out: dict[str, str] = {}
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    for attr in ("watch", "exclude"):
        value = getattr(args, attr, None)
        if value:
            out[attr] = "\n".join(value)
    if getattr(args, "log_level", None):
        out["log_level"] = args.log_level
    return {section: out} if out else {}


def _load(args: argparse.Namespace, default: str) -> Config:
    explicit = getattr(args, "config", None)
    return load([explicit or default], required=bool(explicit), overrides=_overrides(args))


def _secret(args: argparse.Namespace, secret_file: str) -> str:
    """From the command line, the environment, systemd credentials or a file."""
    if getattr(args, "enrollment_secret", None):
        return str(args.enrollment_secret)
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    candidates = [os.path.join(creds, "enrollment.secret")] if creds else []
    candidates.append(secret_file)
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise RarewriteError(f"cannot read the enrollment secret from {path}: {e.strerror}") from None
        if value:
            return value
    return ""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"config error: {problem}", file=sys.stderr)
        print(f"{len(e.problems)} config error(s); nothing started", file=sys.stderr)
        return EXIT_CONFIG
    except EnrollError as e:
        print(f"rarewrite: {e}", file=sys.stderr)
        return EXIT_ERROR
    except RarewriteError as e:
        print(f"rarewrite: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    group, cmd = args.group, args.cmd
    if group == "config":
        return _config_check(args.config)
    if group == "agent" and cmd == "status":
        from agent.sensor.state_dir import read_status

        code, doc = read_status(args.state_dir)
        print(json.dumps(doc, indent=1, sort_keys=True))
        return code
    if group == "agent" and cmd in ("quarantined", "restore"):
        return _quarantined(args, _load(args, AGENT_CONF))
    if group == "agent":
        cfg = _load(args, AGENT_CONF)
        _setup_logging(cfg.agent.log_level)
        secret = _secret(args, cfg.agent.enrollment_secret_file)
        if cmd == "replay":
            from agent.sensor.replay import run_replay

            return run_replay(cfg, args.events, secret)
        from agent.sensor.runtime import run_live

        return run_live(cfg, secret, loader=lambda: _load(args, AGENT_CONF))
    cfg = _load(args, COLLECTOR_CONF)
    _setup_logging(cfg.collector.log_level)
    if cmd == "serve":
        from agent.collector.service import serve

        secret = _secret(args, cfg.collector.enrollment_secret_file)
        if not secret and cfg.collector.enroll_with_secret:
            raise RarewriteError(
                f"no enrollment secret: set ${SECRET_ENV}, --enrollment-secret "
                "or [collector] enrollment_secret_file"
            )
        return serve(cfg, secret)
    if cmd == "evaluate":
        return _evaluate(cfg, args.db, args.at, args.rule)
    if cmd == "agents":
        from agent.collector import admin

        return admin.agents(args.db or cfg.collector.db, args.action, args.agent_id)
    if cmd == "tokens":
        from agent.collector import admin

        return admin.tokens(args.db or cfg.collector.db, args)
    if cmd == "alerts":
        from agent.collector import admin

        return admin.alerts(args.db or cfg.collector.db, args.since, args.json, args.rule)
    if cmd == "migrate":
        from agent.collector.storage import migrate

        print(json.dumps(migrate(args.db or cfg.collector.db), sort_keys=True))
        return 0
    raise RarewriteError(f"unknown command {group} {cmd}")


def _quarantined(args: argparse.Namespace, cfg: Config) -> int:
    import time

    from agent.sensor import quarantine

    _setup_logging(cfg.agent.log_level)
    qdir = cfg.enrich.quarantine_dir
    if args.cmd == "quarantined":
        for meta in quarantine.entries(qdir):
            print(json.dumps(meta, sort_keys=True))
        return 0
    try:
        meta = quarantine.restore(qdir, args.qid, int(time.time() * 1000), force=args.force)
    except (quarantine.QuarantineError, OSError) as e:
        raise RarewriteError(f"not restored: {e}") from None
    print(json.dumps({"restored": meta["path"], "qid": meta["qid"], "alert": meta.get("alert")}))
    return 0


def _evaluate(cfg: Config, db: str, at: str, rule_name: Optional[str]) -> int:
    from agent.collector.evaluate import evaluate_db
    from agent.collector.fleet_rules import evaluate_other_db
    from agent.shared.rule import Rule, row_document
    from agent.shared.rules import find_rule, rule_key
    from agent.shared.text import parse_timestamp

    problems = []
    try:
        at_ms = parse_timestamp(at)
    except ValueError:
        problems.append(f"--at: {at!r} is not an ISO 8601 time (e.g. 2026-11-27T12:00:00.000Z)")
    rule = cfg.rule if rule_name is None else find_rule(cfg.rule, cfg.rules, rule_name)
    if rule is None:
        known = ", ".join(rule_key(r) for r in (cfg.rule, *cfg.rules))
        problems.append(f"--rule: {rule_name!r} is no rule of this config (rules: {known})")
    if problems:
        raise ConfigError(problems)
    out = sys.stdout
    if isinstance(rule, Rule):
        for row in evaluate_db(db, rule, at_ms):
            out.write(json.dumps(row_document(row)) + "\n")
    else:
        assert rule is not None  # noqa: S101 - for mypy: refused above
        for doc in evaluate_other_db(db, rule, cfg.rules, at_ms):
            out.write(json.dumps(doc) + "\n")
    out.flush()
    return 0


def _config_check(files: Optional[list[str]]) -> int:
    # a passed expiry is an error here, where an admin is looking
    if files:
        cfg = load(files, required=True, strict_expiry=True)
    else:
        present = [f for f in (AGENT_CONF, COLLECTOR_CONF) if os.path.exists(f)]
        cfg = load(present, required=False, strict_expiry=True)
    doc: dict[str, Any] = describe(cfg)
    print(json.dumps(doc, indent=1, default=str))
    print(f"config ok: {len(cfg.files)} file(s) read", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
