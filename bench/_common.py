"""Shared helpers for the bench scripts: machine facts, tables, the agent."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.support import procs  # noqa: E402

AS_WWW = ["setpriv", "--reuid=33", "--regid=33", "--clear-groups"]


def machine() -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "mem_mb": mem_kb // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_machine(m: dict[str, Any]) -> None:
    print(
        f"machine: nproc={m['nproc']} mem={m['mem_mb']} MB kernel={m['kernel']} "
        f"python={m['python']} date={m['date']}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def emit(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, sort_keys=True), flush=True)


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def iso_ms(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def status(state: str) -> dict[str, Any]:
    from agent.daemon import read_status

    return read_status(state)[1]


def start_agent(tmp: str, url: str, state: str, watch: str, tag: str = "agent") -> subprocess.Popen[bytes]:
    """``rarewrite agent run`` until its status says running."""
    log = open(os.path.join(tmp, f"{tag}.log"), "ab")  # closed below, the child keeps it
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET}
    p = subprocess.Popen(
        [*procs.RAREWRITE, "agent", "run", "--collector", url, "--state-dir", state, "--watch", watch],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if p.poll() is not None:
            break
        if status(state).get("state") == "running":
            return p
        time.sleep(0.05)
    procs.stop(p)
    with open(os.path.join(tmp, f"{tag}.log"), encoding="utf-8", errors="replace") as f:
        raise RuntimeError("agent did not start: " + f.read()[-2000:])


def wait_matched(
    state: str, want: int, timeout: float, stalled_s: float = 15.0
) -> tuple[dict[str, Any], float | None]:
    """Poll the status until counters.matched >= want; (status, seconds or
    None when it never got there: timeout, or matched still for stalled_s)."""
    t0 = last_move = time.monotonic()
    last = -1
    st: dict[str, Any] = {}
    while True:
        st = status(state)
        matched = st.get("counters", {}).get("matched", 0)
        now = time.monotonic()
        if matched >= want:
            return st, now - t0
        if matched != last:
            last, last_move = matched, now
        if now - t0 > timeout or now - last_move > stalled_s:
            return st, None
        time.sleep(0.05)


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kb(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def evaluate(db: str, at_ms: int, tmp: str, limit: int = 100_000) -> list[dict[str, Any]]:
    """``collector evaluate`` with the row limit raised (the rule's default is 100)."""
    conf = os.path.join(tmp, "bench-collector.conf")
    with open(conf, "w", encoding="ascii") as f:
        f.write(f"[rule]\nlimit = {limit}\n")
    r = procs.run(["collector", "evaluate", "--config", conf, "--db", db, "--at", iso_ms(at_ms)])
    if r.returncode != 0:
        raise RuntimeError("evaluate failed: " + r.stderr[-2000:])
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


# The worst-case burst, one process: F files in D new dirs, every tenth written
# as .tmp and renamed to .php. burst.py and peers.py run the same workload.
BURST_WRITER = r"""
import json, os, sys, time
root, nfiles, ndirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
t0 = time.perf_counter()
dirs = [os.path.join(root, f"d{i:03d}") for i in range(ndirs)]
for d in dirs:
    os.mkdir(d)
per = -(-nfiles // ndirs)
renames = 0
for i in range(nfiles):
    name = f"{dirs[i // per]}/f{i:06d}"
    if i % 10 == 0:
        fd = os.open(name + ".tmp", flags, 0o644)
        os.write(fd, b"<?php ?>\n")
        os.close(fd)
        os.rename(name + ".tmp", name + ".php")
        renames += 1
    else:
        os.close(os.open(name + ".html", flags, 0o644))
print(json.dumps({"wall_s": time.perf_counter() - t0, "files": nfiles, "renames": renames, "dirs": ndirs}))
"""
