"""Which web servers' configs to read: the configured paths, and the ones
the running servers were started with (``nginx -c FILE``, ``apache2 -f
FILE``: a site run from its own config, as test rigs and many appliances
do). Then the web roots and access logs they declare, and the admin's own.

Only a server whose process runs as root names a config to read: the agent
reads it as root, and a user's process that calls itself nginx must not make
it read (and log lines of) a file that user cannot.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Optional

from agent.sensor.enrich.accesslog import compile_format
from agent.sensor.enrich.webroots import WebRoot, configured, discover
from agent.shared.config.schema import EnrichConfig

log = logging.getLogger("rarewrite.enrich")

Found = tuple[list[WebRoot], list[tuple[str, str]]]  # what a discovery finds: roots, (log, format)
NGINX_NAMES = frozenset(("nginx",))
APACHE_NAMES = frozenset(("apache2", "httpd"))
NGINX_PREFIX = "/usr/share/nginx"  # Debian's and Fedora's compiled prefix: a relative -c is under it


def _option(args: list[str], flag: str) -> str:
    """The value after ``flag`` in a command line ("-c FILE" or "-cFILE")."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag) and len(a) > len(flag) and not a.startswith("--"):
            return a[len(flag) :]
    return ""


def running_configs(proc: str = "/proc") -> list[str]:
    """The config files root-owned nginx and Apache processes were started with."""
    found: dict[str, None] = {}
    try:
        pids = sorted((p for p in os.listdir(proc) if p.isdigit()), key=int)
    except OSError:
        return []
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/comm", "rb") as f:
                comm = f.read(64).strip().decode("utf-8", "replace")
            if comm not in NGINX_NAMES and comm not in APACHE_NAMES:
                continue
            if os.stat(f"{proc}/{pid}").st_uid != 0 or not _ours(proc, pid):
                continue  # a worker, a user's process, or root in a container: not ours to follow
            with open(f"{proc}/{pid}/cmdline", "rb") as f:
                raw = f.read(8192)
        except OSError:
            continue
        # nginx rewrites its title ("nginx: master process /usr/sbin/nginx -c F"): split on both
        args = raw.replace(b"\0", b" ").decode("utf-8", "surrogateescape").split()
        conf = _config_of(comm, args)
        if conf:
            found[conf] = None
    return list(found)


def _ours(proc: str, pid: str) -> bool:
    """A server in the agent's own mount namespace running a root-owned
    binary: root in a container could name a file of the host it writes."""
    try:
        if os.readlink(f"{proc}/{pid}/ns/mnt") != os.readlink(f"{proc}/self/ns/mnt"):
            return False
        return os.stat(f"{proc}/{pid}/exe").st_uid == 0
    except OSError:
        return False


def _config_of(comm: str, args: list[str]) -> str:
    if comm in NGINX_NAMES:
        conf = _option(args, "-c")
        if conf and not conf.startswith("/"):
            conf = os.path.join(_option(args, "-p") or NGINX_PREFIX, conf)
        return os.path.normpath(conf) if conf else ""
    conf = _option(args, "-f")
    if conf and not conf.startswith("/"):
        conf = os.path.join(_option(args, "-d") or f"/etc/{comm}", conf)
    return os.path.normpath(conf) if conf else ""


def _by_server(confs: Sequence[str]) -> list[tuple[list[WebRoot], list[str]]]:
    """discover() over config files: nginx's by name, the rest Apache's."""
    nginx = [p for p in confs if "nginx" in os.path.basename(os.path.dirname(p)) + os.path.basename(p)]
    apache = [p for p in confs if p not in nginx]
    out = [discover(nginx_conf=None, apache_confs=apache)] if apache else []
    out.extend(discover(nginx_conf=p, apache_confs=()) for p in nginx)
    return out


class Discovery:
    """``discovery()``: the roots and logs again when the running servers'
    configs changed or FULL_EVERY_S passed; else None (nothing new: a host's
    configs are not parsed again each time, the sensor's loop is waiting)."""

    FULL_EVERY_S = 300.0

    def __init__(self, cfg: EnrichConfig, monotonic: Callable[[], float]) -> None:
        self.cfg, self.monotonic = cfg, monotonic
        self._running: Optional[list[str]] = None
        self._at = -1e18

    def started_with(self, running: list[str]) -> None:
        """What the agent found at start, parsed already."""
        self._running, self._at = running, self.monotonic()

    def __call__(self) -> Optional[Found]:
        running = running_configs()
        now = self.monotonic()
        if running == self._running and now < self._at + self.FULL_EVERY_S:
            return None
        self._running, self._at = running, now
        return targets(self.cfg, running, [])  # the admin's own entries were checked at start


def targets(cfg: EnrichConfig, running: Sequence[str], problems: list[str]) -> Found:
    """The web roots and the (log, format) to follow, from the config and the
    ``running`` servers' configs; what the admin wrote wrong goes into ``problems``."""
    roots = web_roots(cfg, problems, running)
    return roots, access_logs(cfg, roots, problems)


def web_roots(cfg: EnrichConfig, problems: list[str], running: Sequence[str] = ()) -> list[WebRoot]:
    """The web roots of ``[enrich] web_roots``: ``auto`` ones from the server
    configs (``server_configs`` and ``running``), then the admin's own; an
    entry that is not one goes into ``problems``."""
    roots: list[WebRoot] = []
    for spec in cfg.web_roots:
        if spec == "auto":
            confs = list(dict.fromkeys([*cfg.server_configs, *running]))
            for found, issues in _by_server(confs):
                roots.extend(found)
                for issue in issues:  # a server's config we cannot read is not the agent's error
                    log.warning("event=web_server_config problem=%r", issue[:300])
        else:
            root = configured(spec)
            if root is None:
                problems.append(f"[enrich] web_roots: {spec!r} is not DIR[:EXT,EXT][@/URL]")
            else:
                roots.append(root)
    return list(dict.fromkeys(roots))


def access_logs(cfg: EnrichConfig, roots: Sequence[WebRoot], problems: list[str]) -> list[tuple[str, str]]:
    """(path, format) of ``[enrich] access_logs`` (``auto``: the roots' own),
    each format compiled once here: one that cannot be goes into ``problems``."""
    logs: dict[str, str] = {}
    for log_path, fmt in cfg.access_logs:
        if log_path == "auto":
            for root in roots:
                for p, f in root.access_logs:
                    logs.setdefault(p, f or "combined")
        else:
            logs[log_path] = fmt
    for bad in [p for p in logs if "\0" in p or not p.startswith("/")]:
        log.warning("event=access_log_path_unusable log=%r", bad[:200])
        del logs[bad]
    for log_path, fmt in list(logs.items()):
        try:
            compile_format(fmt)
        except ValueError as e:
            if any(p == log_path for p, _ in cfg.access_logs):
                problems.append(f"[enrich] access_logs: {log_path}: {e}")
            else:  # a server's own log_format we cannot read: that log goes unread, said once
                log.warning("event=access_log_format_unknown log=%r error=%r", log_path, str(e)[:200])
            del logs[log_path]
    return sorted(logs.items())
