"""Real processes for end-to-end tests: a collector on loopback, agents."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

SECRET = "test-enrollment-secret-0123456789"
RAREWRITE = [os.path.join(os.path.dirname(sys.executable), "rarewrite")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: Sequence[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": SECRET}
    return subprocess.run(
        [*RAREWRITE, *args], check=False, capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


@dataclass
class Collector:
    url: str
    db: str
    proc: subprocess.Popen[bytes]
    log: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_text(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def collector(
    tmp: str, *extra: str, port: int | None = None, db: str | None = None, nofile: int | None = None
) -> Iterator[Collector]:
    """``collector serve`` on loopback; ``nofile``: its soft descriptor limit at start."""
    port = port or free_port()
    db = db or os.path.join(tmp, "collector.db")
    log = os.path.join(tmp, f"collector-{port}.log")
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": SECRET}
    limit = [] if nofile is None else ["prlimit", f"--nofile={nofile}:"]  # util-linux: the soft limit only
    with open(log, "ab") as out:
        p = subprocess.Popen(
            [*limit, *RAREWRITE, "collector", "serve", "--listen", f"127.0.0.1:{port}", "--db", db, *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    c = Collector(f"http://127.0.0.1:{port}", db, p, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(c.url + "/healthz", timeout=2) as r:  # noqa: S310 - loopback
                    if r.status == 200:
                        break
            except OSError:
                pass
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("collector did not come up: " + c.log_text()[-2000:])
            time.sleep(0.1)
        yield c
    finally:
        stop(p)


def stop(p: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, wait: float = 20) -> int | None:
    if p is None or p.poll() is not None:
        return None if p is None else p.returncode
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)
    try:
        return p.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return p.wait()


def evaluate(db: str, at_ms: int) -> list[dict[str, Any]]:
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms // 1000)) + f".{at_ms % 1000:03d}Z"
    r = run(["collector", "evaluate", "--db", db, "--at", at])
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def replay(events: str, url: str, state: str, agent_id: str, host: str) -> subprocess.CompletedProcess[str]:
    return run(
        [
            "agent",
            "replay",
            "--events",
            events,
            "--collector",
            url,
            "--state-dir",
            state,
            "--agent-id",
            agent_id,
            "--host-name",
            host,
        ],
        timeout=180,
    )
