#!/usr/bin/env python3
"""A flood to blind the sensor, with a web shell hidden in it (issue 16).

Root only. The attacker runs code as the web user: a process named
``php-fpm8.2`` (a symlink to python) running as www-data creates and deletes
files as fast as it can, rotating 100 names in one folder (every creation
matches the rule; no name is rare, so the flood raises no alert of its
own), for ``--seconds``. ``--shell-at`` seconds into the flood the same
process writes ``shell.php`` in another folder once: the one rare row.

The agent runs under the unit's limits in its own cgroup (cgroup v1 here:
``cpu.cfs_quota_us`` 20% of one core, ``memory.limit_in_bytes`` 200M; v2's
cpu.max and memory.max where mounted), shipping to a real
``collector serve`` (continuous schedule, settle 1 s) on this host.

Reported per agent: flood rate (creations/s the writer achieved), agent CPU
(share of one core over the flood), agent RSS (max, sampled every 50 ms),
the cgroup's memory (max of usage; of that, kernel memory where the cgroup
reports it: where fanotify's queued events are charged), OOM kills in the
cgroup, whether the agent survived, events lost (the agent's ``lost``
counter and overflow records), whether an ``agent_loss`` (sensor-blind)
alert came, and seconds from the shell's write until its alert was in the
alerts file (``shell_alert_s``; None if it never came within
``--wait``), and until its event was in the collector's database
(``shell_stored_s``). ``--against DIR`` runs another checkout's agent the same way in
the same run (e.g. ``git worktree add /tmp/rw-old HEAD~1``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

import _common as c

from tests.support import procs

FLOOD_WRITER = r"""
import json, os, sys, time
flood, shell_dir, seconds, shell_at = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
names = [os.path.join(flood, f"f{i:03d}.php") for i in range(100)]
t0 = time.monotonic()
n, shell_ms, i = 0, None, 0
while True:
    now = time.monotonic() - t0
    if now >= seconds:
        break
    if shell_ms is None and now >= shell_at:
        shell_ms = time.time_ns() // 1_000_000
        fd = os.open(os.path.join(shell_dir, "shell.php"), flags, 0o644)
        os.write(fd, b"<?php system($_GET['c']); ?>\n")
        os.close(fd)
    for _ in range(200):
        p = names[i % 100]
        os.close(os.open(p, flags, 0o644))
        os.unlink(p)
        i += 1
    n += 200
print(json.dumps({"creations": n, "wall_s": time.monotonic() - t0, "shell_ms": shell_ms}))
"""

COLLECTOR_CONF = "[collector]\nschedule = continuous\nsettle = 1s\nalerts_file = {alerts}\n"
CPU_QUOTA_US, CPU_PERIOD_US = 20_000, 100_000  # CPUQuota=20%
MEMORY_MAX = 200 << 20  # MemoryMax=200M


class Cgroup:
    """A cpu + memory cgroup with the unit's limits (v2 if mounted, else v1)."""

    def __init__(self, tag: str) -> None:
        name = f"rw-flood-{tag}-{os.getpid()}"
        self.v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        if self.v2:
            self.dirs = [os.path.join("/sys/fs/cgroup", name)]
            os.mkdir(self.dirs[0])
            self._write(self.dirs[0], "cpu.max", f"{CPU_QUOTA_US} {CPU_PERIOD_US}")
            self._write(self.dirs[0], "memory.max", str(MEMORY_MAX))
            self.mem = self.dirs[0]
        else:
            self.cpu = os.path.join("/sys/fs/cgroup/cpu", _own("cpu"), name)
            self.mem = os.path.join("/sys/fs/cgroup/memory", _own("memory"), name)
            self.dirs = [self.cpu, self.mem]
            for d in self.dirs:
                os.mkdir(d)
            self._write(self.cpu, "cpu.cfs_period_us", str(CPU_PERIOD_US))
            self._write(self.cpu, "cpu.cfs_quota_us", str(CPU_QUOTA_US))
            self._write(self.mem, "memory.limit_in_bytes", str(MEMORY_MAX))

    @staticmethod
    def _write(d: str, name: str, value: str) -> None:
        with open(os.path.join(d, name), "w", encoding="ascii") as f:
            f.write(value)

    def wrap(self, argv: list[str]) -> list[str]:
        """argv, run inside the cgroup (the shell joins it, then execs)."""
        joins = "; ".join(f"echo $$ > {os.path.join(d, 'cgroup.procs')}" for d in self.dirs)
        return ["sh", "-c", joins + '; exec "$@"', "sh", *argv]

    def memory(self) -> tuple[int, Optional[int]]:
        """(usage, kernel part or None) in bytes."""
        if self.v2:
            usage = int(_read(self.mem, "memory.current"))
            stat = dict(line.split() for line in _read(self.mem, "memory.stat").splitlines())
            return usage, int(stat["kernel"]) if "kernel" in stat else None
        usage = int(_read(self.mem, "memory.usage_in_bytes"))
        try:
            return usage, int(_read(self.mem, "memory.kmem.usage_in_bytes"))
        except OSError:
            return usage, None

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        for line in _read(self.mem, name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def close(self) -> None:
        for d in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.1)


def _own(controller: str) -> str:
    """This process's cgroup path in a v1 hierarchy (children go below it)."""
    with open("/proc/self/cgroup", encoding="ascii") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(","):
                return path.lstrip("/")
    return ""


def _read(d: str, name: str) -> str:
    with open(os.path.join(d, name), encoding="ascii") as f:
        return f.read()


class Sampler(threading.Thread):
    def __init__(self, pid: int, cg: Cgroup) -> None:
        super().__init__(daemon=True)
        self.pid, self.cg, self.stop = pid, cg, threading.Event()
        self.rss_kb = self.mem = self.kmem = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.rss_kb = max(self.rss_kb, c.proc_rss_kb(self.pid))
                usage, kmem = self.cg.memory()
            except OSError:
                return
            self.mem, self.kmem = max(self.mem, usage), max(self.kmem, kmem or 0)
            self.stop.wait(0.05)


def _alerts(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _stored(db: str, path: str) -> bool:
    """The shell's pair is in the collector's database (read-only look)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return (
                conn.execute("SELECT 1 FROM pairs WHERE path = ?", (os.fsencode(path),)).fetchone()
                is not None
            )
    except sqlite3.Error:
        return False


def run_one(mode: str, checkout: Optional[str], target: str, a: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix=f"rw-flood-{mode}-")  # burst_writer opens it to www-data
    alerts = os.path.join(tmp, "alerts.ndjson")
    conf = os.path.join(tmp, "collector.conf")
    with open(conf, "w", encoding="ascii") as f:
        f.write(COLLECTOR_CONF.format(alerts=alerts))
    root = os.path.join(target, mode)
    flood, shell_dir = os.path.join(root, "uploads"), os.path.join(root, "site")
    for d in (root, flood, shell_dir):
        os.mkdir(d)
        shutil.chown(d, 33, 33)
    cg = Cgroup(mode)
    try:
        with procs.collector(tmp, "--config", conf) as col:
            state = os.path.join(tmp, "state")
            agent = c.start_agent(
                tmp, col.url, state, root, tag=mode, command=cg.wrap(c.rarewrite_of(checkout))
            )
            try:
                return _measure(col.db, agent, cg, state, alerts, flood, shell_dir, tmp, a)
            finally:
                procs.stop(agent)
                if a.verbose:
                    with open(os.path.join(tmp, f"{mode}.log"), encoding="utf-8", errors="replace") as f:
                        print(f.read()[-3000:])
                    print(col.log_text()[-3000:])
    finally:
        cg.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(
    db: str,
    agent: subprocess.Popen[bytes],
    cg: Cgroup,
    state: str,
    alerts: str,
    flood: str,
    shell_dir: str,
    tmp: str,
    a: argparse.Namespace,
) -> dict[str, Any]:
    sampler = Sampler(agent.pid, cg)
    sampler.start()
    cpu0 = c.proc_cpu_s(agent.pid)
    shell = os.path.join(shell_dir, "shell.php")
    writer = subprocess.Popen(
        [*c.burst_writer(tmp, code=FLOOD_WRITER), flood, shell_dir, str(a.seconds), str(a.shell_at)],
        stdout=subprocess.PIPE,
        text=True,
    )
    seen: dict[str, int] = {}  # what -> wall ms when this loop first saw it, polled during the flood too
    cpu_flood: Optional[float] = None
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        if deadline is None and writer.poll() is not None:  # the flood is over: wait at most --wait more
            deadline = time.monotonic() + a.wait
            cpu_flood = c.proc_cpu_s(agent.pid) - cpu0 if agent.poll() is None else None
        now_ms = time.time_ns() // 1_000_000
        if "stored" not in seen and _stored(db, shell):
            seen["stored"] = now_ms
        for d in _alerts(alerts):
            if d.get("file", {}).get("path") == shell:
                seen.setdefault("alert", now_ms)
            if d.get("rarewrite", {}).get("health", {}).get("kind") == "agent_loss":
                seen.setdefault("loss", now_ms)
        if deadline is not None and "alert" in seen:
            break
        time.sleep(0.1)
    w = json.loads(writer.communicate()[0])
    if "loss" not in seen:
        time.sleep(1.0)  # the loss alert rides on the next batch
        if any(d.get("rarewrite", {}).get("health", {}).get("kind") == "agent_loss" for d in _alerts(alerts)):
            seen["loss"] = time.time_ns() // 1_000_000

    def after_shell(what: str) -> Optional[float]:
        return (seen[what] - w["shell_ms"]) / 1000.0 if what in seen else None

    sampler.stop.set()
    sampler.join()
    st = c.status(state)
    cnt = st.get("counters", {})
    return {
        "flood_creations": w["creations"],
        "flood_rate_per_s": w["creations"] / w["wall_s"],
        "agent_cpu_share": cpu_flood / w["wall_s"] if cpu_flood is not None else None,
        "agent_rss_max_mb": sampler.rss_kb / 1024,
        "cgroup_mem_max_mb": sampler.mem / 2**20,
        "cgroup_kmem_max_mb": sampler.kmem / 2**20 if sampler.kmem else None,
        "oom_kills": cg.oom_kills(),
        "agent_alive": agent.poll() is None,
        "matched": cnt.get("matched"),
        "lost": cnt.get("lost"),
        "overflows": cnt.get("overflows"),
        "flood_muted": st.get("source", {}).get("flood_muted"),
        "flood_dropped": st.get("source", {}).get("flood_dropped"),
        "loss_alert": "loss" in seen,
        "shell_stored_s": after_shell("stored"),
        "shell_alert_s": after_shell("alert"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="a 10 s flood, the shell at 7 s (the test suite's smoke run)"
    )
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the flood runs (30)")
    ap.add_argument(
        "--shell-at", type=float, default=5.0, help="seconds into the flood the shell is written (5)"
    )
    ap.add_argument(
        "--wait", type=float, default=120.0, help="how long to wait for the shell's alert after the flood"
    )
    ap.add_argument("--verbose", action="store_true", help="print the agent's and the collector's log tails")
    ap.add_argument("--against", metavar="DIR", help="also run another checkout's agent the same way")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.shell_at, a.wait = 10.0, 7.0, 30.0
    if os.geteuid() != 0:
        print("flood.py: needs root (fanotify, cgroups, setpriv)", file=sys.stderr)
        return 2
    m = c.machine()
    c.print_machine(m)
    target = c.Target("tmpfs", 256, "flood")
    results: dict[str, Any] = {}
    try:
        for mode, checkout in [("agent", None)] + ([("against", a.against)] if a.against else []):
            results[mode] = run_one(mode, checkout, target.mnt, a)
    finally:
        target.close()
    keys = list(results["agent"])
    c.table(["", *results], [[k, *(results[m][k] for m in results)] for k in keys])
    c.emit({"bench": "flood", "quick": a.quick, "machine": m, "seconds": a.seconds, "shell_at": a.shell_at,
            "against": a.against, "results": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
