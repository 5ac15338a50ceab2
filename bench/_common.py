"""Shared helpers for the bench scripts: machine facts, tables, the agent."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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
    from agent.sensor.state_dir import read_status

    return read_status(state)[1]


def rarewrite_of(checkout: str | None) -> list[str]:
    """The ``rarewrite`` command of this checkout (None), or of another one's
    ``agent`` package run by this venv's interpreter (``--against DIR``)."""
    if checkout is None:
        return list(procs.RAREWRITE)
    code = "import sys; sys.path.insert(0, sys.argv.pop(1)); from agent.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, os.path.abspath(checkout)]


def start_agent(
    tmp: str, url: str, state: str, watch: str, tag: str = "agent", command: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """``rarewrite agent run`` (or ``command``) until its status says running."""
    log = open(os.path.join(tmp, f"{tag}.log"), "ab")  # closed below, the child keeps it
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET}
    p = subprocess.Popen(
        [
            *(command or procs.RAREWRITE),
            "agent",
            "run",
            "--collector",
            url,
            "--state-dir",
            state,
            "--watch",
            watch,
        ],
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


def wait_counter(
    state: str, want: int, timeout: float, stalled_s: float = 15.0, key: str = "matched"
) -> tuple[dict[str, Any], float | None]:
    """Poll the status until counters[key] >= want; (status, seconds or
    None when it never got there: timeout, or the counter still for stalled_s)."""
    t0 = last_move = time.monotonic()
    last = -1
    st: dict[str, Any] = {}
    while True:
        st = status(state)
        got = st.get("counters", {}).get(key, 0)
        now = time.monotonic()
        if got >= want:
            return st, now - t0
        if got != last:
            last, last_move = got, now
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


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), check=False, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(r.stderr or r.stdout).strip()[-500:]}")
    return r


class Target:
    """A scratch filesystem (tmpfs, or ext4 on a loop device) under /srv."""

    def __init__(self, fs: str, size_mb: int, tag: str) -> None:
        self.fs = fs
        os.makedirs("/srv", exist_ok=True)
        self.mnt = tempfile.mkdtemp(prefix=f"rw-{tag}-{fs}-", dir="/srv")
        self.image: str | None = None
        if fs == "tmpfs":
            sh("mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", self.mnt)
        else:
            fd, self.image = tempfile.mkstemp(prefix=f"rw-{tag}-", suffix=".ext4", dir="/var/tmp")
            os.close(fd)
            os.truncate(self.image, size_mb << 20)
            sh("mkfs.ext4", "-q", "-F", "-N", "400000", self.image)
            sh("mount", "-o", "loop", self.image, self.mnt)
        shutil.chown(self.mnt, 33, 33)

    def close(self) -> None:
        subprocess.run(["umount", self.mnt], check=False, capture_output=True)
        if self.image:
            os.unlink(self.image)
        os.rmdir(self.mnt)


def burst_writer(
    tmp: str, name: str = "php-fpm8.2", as_www: bool = True, code: str = BURST_WRITER
) -> list[str]:
    """The burst writer's argv: python under the task name ``name`` (a
    symlink in ``tmp``) running ``code`` (BURST_WRITER), as www-data unless not ``as_www``."""
    os.chmod(tmp, 0o755)  # noqa: S103 - www-data reads the writer script here
    exe = os.path.join(tmp, name)
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    os.symlink(os.path.realpath(py), exe)
    script = os.path.join(tmp, "writer.py")
    with open(script, "w", encoding="ascii") as f:
        f.write(code)
    os.chmod(script, 0o644)
    return [*(AS_WWW if as_www else []), exe, script]


def workload(writer: list[str], root: str, nfiles: int, ndirs: int) -> dict[str, Any]:
    """Run BURST_WRITER (``writer``: its argv, with the setpriv prefix for www-data)
    in a fresh ``root``; its JSON line plus the wall time seen from outside."""
    os.mkdir(root)
    shutil.chown(root, 33, 33)
    os.sync()
    t0 = time.perf_counter()
    r = subprocess.run([*writer, root, str(nfiles), str(ndirs)], check=False, capture_output=True, text=True)
    outer = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError("writer failed: " + r.stderr[-2000:])
    doc: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    doc["outer_s"] = outer
    return doc


STUB = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        self._reply(b"ok\n")

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        while n > 0:
            got = self.rfile.read(min(n, 1 << 20))
            if not got:
                break
            n -= len(got)
        if self.path.endswith("/enroll"):
            self._reply(json.dumps({"api_key": "stub-key"}).encode())
        else:
            self._reply(b'{"status": "stored"}')

    def _reply(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@contextlib.contextmanager
def stub_collector(tmp: str) -> Iterator[str]:
    """A collector stand-in on loopback that enrolls and answers 200 to every
    batch, storing nothing: only the agent is measured. Yields its URL."""
    port = procs.free_port()
    with open(os.path.join(tmp, "stub.log"), "ab") as log:
        p = subprocess.Popen(
            [sys.executable, "-c", STUB, str(port)], stdout=log, stderr=log, start_new_session=True
        )
    try:
        wait_port(port, p)
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop(p)


def wait_port(port: int, p: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Until the stub ``p`` listens on loopback ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError("stub collector did not start") from None
            time.sleep(0.05)


@contextlib.contextmanager
def real_collector(tmp: str) -> Iterator[str]:
    with procs.collector(tmp) as col:
        yield col.url


def top_functions(raw: str, n: int = 12) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's raw collapsed stacks: functions by inclusive % (line
    numbers dropped) and source lines by self % (where the time is spent)."""
    self_lines: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(raw, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, cnt = line.rstrip("\n").rpartition(" ")
            if not stack or not cnt.isdigit():
                continue
            k = int(cnt)
            total += k
            frames = stack.split(";")
            self_lines[frames[-1]] += k
            for fn in {re.sub(r":\d+\)$", ")", fr) for fr in frames}:
                incl[fn] += k
    if not total:
        return {"inclusive": [], "self_lines": []}
    return {
        "inclusive": [
            (fn, v * 100 / total)
            for fn, v in incl.most_common(n + 8)
            if "threading.py" not in fn and "concurrent/futures" not in fn
        ][:n],
        "self_lines": [(fn, v * 100 / total) for fn, v in self_lines.most_common(n)],
    }
