"""``make run``: a collector and an agent on this host, in one command.

The collector listens on 127.0.0.1:8787 with SQLite in ./run and the
continuous schedule, and prints each alert as one line. The agent watches
the whole host with fanotify when run as root; otherwise it falls back to
inotify on ./run/www and says so. Ctrl-C stops both.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Optional

LISTEN = ("127.0.0.1", 8787)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"collector exited early; see {log}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:  # noqa: S310 - loopback URL
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"collector did not come up within 30 s; see {log}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _write_configs(run_dir: str, root: bool) -> tuple[str, str, str]:
    """(collector config, agent config, the inotify folder) in ``run_dir``."""
    col_conf = os.path.join(run_dir, "collector.conf")
    with open(col_conf, "w", encoding="utf-8") as f:
        f.write("[collector]\nschedule = continuous\nsettle = 5s\nalerts_stdout = yes\n")
    agent_conf = os.path.join(run_dir, "agent.conf")
    www = os.path.join(run_dir, "www")
    with open(agent_conf, "w", encoding="utf-8") as f:
        if root:
            f.write("[agent]\nbackend = fanotify\nwatch = /\nship_interval = 500ms\n")
        else:
            os.makedirs(www, exist_ok=True)
            f.write(f"[agent]\nbackend = inotify\nwatch = {www}\nship_interval = 500ms\n")
    return col_conf, agent_conf, www


def _print_hints(root: bool, www: str) -> None:
    if root:
        print("rarewrite: the agent watches this whole host (fanotify). Try, as root:", flush=True)
        print(
            "  cp /bin/dash /tmp/nginx && setpriv --reuid=33 --regid=33 --clear-groups "
            "/tmp/nginx -c ': > /tmp/shell.php'",
            flush=True,
        )
    else:
        print(
            "rarewrite: WARNING not root: fanotify needs CAP_SYS_ADMIN, so the agent uses inotify "
            f"on {www} only, and infers the writer from the file owner",
            flush=True,
        )
    print("rarewrite: alerts print here within seconds (settle 5 s); Ctrl-C stops both.", flush=True)


def main(run_dir: str = "run") -> int:
    # SIGTERM and SIGHUP stop both children as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    with socket.socket() as s:
        if s.connect_ex(LISTEN) == 0:
            sys.exit(f"something already listens on {LISTEN[0]}:{LISTEN[1]}; stop it first")
    exe = os.path.join(os.path.dirname(sys.executable), "rarewrite")
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": secrets.token_urlsafe(24)}
    url = f"http://{LISTEN[0]}:{LISTEN[1]}"
    root = os.geteuid() == 0

    col_conf, agent_conf, www = _write_configs(run_dir, root)
    col_log, agent_log = os.path.join(run_dir, "collector.log"), os.path.join(run_dir, "agent.log")
    procs: list[subprocess.Popen[bytes]] = []
    agent: Optional[subprocess.Popen[bytes]] = None
    try:
        with open(col_log, "ab") as log:
            collector = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
                [exe, "collector", "serve", "--config", col_conf, "--listen", f"{LISTEN[0]}:{LISTEN[1]}",
                 "--db", os.path.join(run_dir, "collector.db"),
                 "--alerts-file", os.path.join(run_dir, "alerts.ndjson")],
                env=env, stderr=log, start_new_session=True,
            )  # fmt: skip
        procs.append(collector)
        _wait_healthy(url, collector, col_log)
        with open(agent_log, "ab") as log:
            agent = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
                [exe, "agent", "run", "--config", agent_conf, "--collector", url,
                 "--state-dir", os.path.join(run_dir, "agent")],
                env=env, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        procs.append(agent)
        print(f"rarewrite: collector on {url} (logs {col_log}), agent logs {agent_log}", flush=True)
        _print_hints(root, www)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        failed = next(p for p in procs if p.poll() is not None)
        which = "collector" if failed is collector else "agent"
        print(f"rarewrite: the {which} exited ({failed.returncode}); see its log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nrarewrite: stopping", flush=True)
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
