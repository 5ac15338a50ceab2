#!/usr/bin/env python3
"""The worst-case burst side by side with the peers (issue 7): auditd, fatrace,
bpftrace, a bare Python fanotify reader (the floor) and ``rarewrite agent run``.

Root only. The workload is burst.py's: ONE web-server-named process as
www-data creates D new directories and F files in them on a scratch
filesystem, every 10th file written as ``.tmp`` and renamed to ``.php``
(F + F/10 + D = 110,100 matching events at full size). Here the writer is a
COPY of the Python interpreter named ``php-fpm-peers`` (so its executable
path and its comm are this script's own: the machine is shared, and other
benchmarks run the same burst as ``php-fpm8.2``; the audit and bpftrace
filters below name it so nobody else's runs are slowed or counted).

For each tool, alternating pairs (order flipped every pair) of: no sensor,
and the workload with that tool running. Ratio = tool wall / none wall of the
same pair (the writer's own wall time for the work); the median of the paired
ratios is the figure. Per tool:

  auditd     auditd (own config: log in the temp dir, no rotation) with
             syscall rules for uid 33 on this writer's executable: creat,
             open/openat with O_CREAT, rename/renameat/renameat2,
             mkdir/mkdirat. "seen" = SYSCALL records with the rules' key.
             Rules deleted (-d, exactly ours) and auditing disabled again
             afterwards, auditd stopped, in a finally.
  fatrace    ``fatrace -c -f C`` in the scratch mount (creations on that
             mount only). "seen" = output lines of the writer.
  bpftrace   tracepoints sys_enter_{open,openat,creat} with O_CREAT,
             sys_enter_{rename,renameat,renameat2}, sys_enter_{mkdir,mkdirat},
             filtered in the kernel on uid 33 and the writer's comm, one
             printf line per event. "seen" = output lines; perf-buffer loss
             is what bpftrace reports as "Lost N events".
  floor      a bare Python fanotify reader (agent/sources/fanotify_abi.py):
             FAN_REPORT_DFID_NAME, unlimited queue, a filesystem mark on the
             scratch mount for FAN_CREATE|FAN_MOVED_TO|FAN_ONDIR; reads, parses,
             looks the pid's executable up once (pid cache) and discards.
  rarewrite  ``rarewrite agent run --watch MOUNT``; "seen" = the status
             counter ``matched``. It ships to a stub collector on loopback
             (enroll, then 200 for every batch, nothing decoded or stored:
             only the agent is measured, like burst.py's default), or with
             ``--collector real`` to ``rarewrite collector serve`` on this host.

Missing tools are installed with apt-get (not in --quick, which uses only
what is installed); a tool that cannot run here is skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import _common as c

from tests.support import procs

COMM = "php-fpm-peers"  # <= 15 chars, matches the rule's php-*
AUDIT_KEY = "rarewrite-peers"
TOOLS = ("auditd", "fatrace", "bpftrace", "floor", "rarewrite")
APT = {"auditd": "auditd", "fatrace": "fatrace", "bpftrace": "bpftrace"}
BINARY = {"auditd": "auditd", "fatrace": "fatrace", "bpftrace": "bpftrace"}
LACKS = {
    "none": "-",
    "auditd": "nothing (path, exe, pid, uid, cwd), but each record is made inside the writer's syscall",
    "fatrace": "no uid, no exe (comm+pid), no renames, no new dirs; drops events silently under a burst",
    "bpftrace": "no exe (comm only); syscall attempts at entry, not results; dirfd-relative names unresolved",
    "floor": "all past read(): names not resolved to paths, no rule, no store, no shipping",
    "rarewrite": "- (path, exe, pid, uid, command line, file facts; rule, store, shipping)",
}

WRITER = c.BURST_WRITER

FLOOR = r"""
import os, select, signal, sys
sys.path.insert(0, sys.argv[2])
from agent.sensor.sources.fanotify import abi as fa
fd = fa.fanotify_init(fa.FAN_CLASS_NOTIF | fa.FAN_CLOEXEC | fa.FAN_NONBLOCK | fa.FAN_UNLIMITED_QUEUE
                      | fa.FAN_REPORT_DFID_NAME, os.O_RDONLY | fa.O_LARGEFILE)
fa.fanotify_mark(fd, fa.FAN_MARK_ADD | fa.FAN_MARK_FILESYSTEM,
                 fa.FAN_CREATE | fa.FAN_MOVED_TO | fa.FAN_ONDIR, fa.AT_FDCWD, sys.argv[1].encode())
r, w = os.pipe()
signal.signal(signal.SIGTERM, lambda *_: os.write(w, b"x"))
cache, n, ovf = {}, 0, 0
print("ready", flush=True)
while True:
    ready = select.select([fd, r], [], [])[0]
    if fd in ready:
        while True:
            try:
                buf = os.read(fd, 1 << 18)
            except BlockingIOError:
                break
            for ev in fa.parse_buffer(buf).events:
                if ev.mask & fa.FAN_Q_OVERFLOW:
                    ovf += 1
                    continue
                n += 1
                if ev.pid not in cache:
                    try:
                        cache[ev.pid] = os.readlink(f"/proc/{ev.pid}/exe")
                    except OSError:
                        cache[ev.pid] = None
    elif r in ready:
        break
print("seen", n, "overflows", ovf, flush=True)
"""


def _wait_for(path: str, pattern: str, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with open(path, encoding="utf-8", errors="replace") as f:
            if pattern in f.read():
                return
        time.sleep(0.05)
    with open(path, encoding="utf-8", errors="replace") as f:
        raise RuntimeError(f"did not start ({pattern!r} not seen): {f.read()[-1000:]}")


def _popen(argv: list[str], log: str, **kw: Any) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)


class Sensor:
    """start() before the workload, stop() after it returns the counts."""

    name = "none"

    def start(self, k: int) -> None:
        pass

    def stop(self, expected: int) -> dict[str, Any]:
        return {}


class Auditd(Sensor):
    name = "auditd"

    def __init__(self, tmp: str, exe: str) -> None:
        self.tmp, self.exe = tmp, exe
        self.conf = os.path.join(tmp, "audit")
        os.makedirs(self.conf, exist_ok=True)
        self.log = os.path.join(self.conf, "audit.log")
        base = "/etc/audit/auditd.conf"
        lines = []
        if os.path.exists(base):
            with open(base, encoding="utf-8") as f:
                lines = [
                    x
                    for x in f.read().splitlines()
                    if not re.match(r"\s*(log_file|max_log_file_action|flush|plugin_dir)\s*=", x)
                ]
        lines += [f"log_file = {self.log}", "max_log_file_action = ignore", "flush = incremental_async",
                  f"plugin_dir = {self.conf}/plugins.d"]  # fmt: skip
        os.makedirs(os.path.join(self.conf, "plugins.d"), exist_ok=True)
        with open(os.path.join(self.conf, "auditd.conf"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(os.path.join(self.conf, "auditd.conf"), 0o640)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        st = c.sh("auditctl", "-s", check=False)
        m = re.search(r"^pid (\d+)", st.stdout, re.M)
        if m and int(m.group(1)) != 0 and os.path.exists(f"/proc/{m.group(1)}"):
            raise RuntimeError(f"an audit daemon (pid {m.group(1)}) is already running; not touching it")
        self.proc = _popen(["auditd", "-n", "-c", self.conf], os.path.join(tmp, "auditd.out"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = c.sh("auditctl", "-s", check=False)
            if re.search(rf"^pid {self.proc.pid}$", st.stdout, re.M):
                break
            if self.proc.poll() is not None:
                raise RuntimeError("auditd exited: " + open(os.path.join(tmp, "auditd.out")).read()[-500:])
            time.sleep(0.1)
        else:
            raise RuntimeError("auditd did not register with the kernel")
        c.sh("auditctl", "-b", "8192")
        c.sh("auditctl", "-e", "1")
        common = ["-F", "arch=b64"]
        filt = ["-F", "uid=33", "-F", f"exe={exe}", "-k", AUDIT_KEY]
        self.rules = [
            [*common, "-S", "creat", *filt],
            [*common, "-S", "open", "-F", "a1&64", *filt],
            [*common, "-S", "openat", "-F", "a2&64", *filt],
            [*common, "-S", "rename,renameat,renameat2", *filt],
            [*common, "-S", "mkdir,mkdirat", *filt],
        ]
        self.added: list[list[str]] = []

    def _size(self) -> int:
        return os.path.getsize(self.log) if os.path.exists(self.log) else 0

    def _count(self) -> int:
        """SYSCALL records with our key written since start()."""
        n = 0
        needle = f'key="{AUDIT_KEY}"'.encode()
        if os.path.exists(self.log):
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                for line in f:
                    if line.startswith(b"type=SYSCALL") and needle in line:
                        n += 1
        return n

    def start(self, k: int) -> None:
        self.offset = self._size()
        self.lost0 = self._lost()
        for r in self.rules:
            c.sh("auditctl", "-a", "always,exit", *r)
            self.added.append(r)

    def _lost(self) -> int:
        m = re.search(r"^lost (\d+)", c.sh("auditctl", "-s", check=False).stdout, re.M)
        return int(m.group(1)) if m else 0

    def remove_rules(self) -> None:
        while self.added:
            c.sh("auditctl", "-d", "always,exit", *self.added.pop(), check=False)

    def stop(self, expected: int) -> dict[str, Any]:
        self.remove_rules()
        deadline = time.monotonic() + 30
        seen = self._count()
        while seen < expected and time.monotonic() < deadline:  # auditd writes asynchronously
            time.sleep(0.5)
            now = self._count()
            if now == seen:
                break
            seen = now
        return {"seen": seen, "lost_reported": self._lost() - self.lost0}

    def close(self) -> None:
        self.remove_rules()
        c.sh("auditctl", "-e", "0", check=False)
        if self.proc is not None:
            procs.stop(self.proc)


class Fatrace(Sensor):
    name = "fatrace"

    def __init__(self, tmp: str, mnt: str) -> None:
        self.tmp, self.mnt = tmp, mnt

    def start(self, k: int) -> None:
        self.out = os.path.join(self.tmp, f"fatrace-{k}.txt")
        self.log = os.path.join(self.tmp, f"fatrace-{k}.log")
        open(self.log, "w").close()
        self.proc = _popen(["fatrace", "-c", "-f", "C", "-o", self.out], self.log, cwd=self.mnt)
        time.sleep(1.0)  # fatrace says nothing when ready; its marks are set within ms
        if self.proc.poll() is not None:
            raise RuntimeError("fatrace exited: " + open(self.log).read()[-500:])

    def stop(self, expected: int) -> dict[str, Any]:
        time.sleep(0.5)
        procs.stop(self.proc, signal.SIGINT)
        n = total = 0
        with open(self.out, encoding="utf-8", errors="replace") as f:
            for line in f:
                total += 1
                n += line.startswith(COMM + "(")
        return {"seen": n, "lines_total": total}


BPF = r"""
tracepoint:syscalls:sys_enter_openat /uid == 33 && comm == "COMM" && (args->flags & 64)/
{ printf("%d %s openat %s\n", pid, comm, str(args->filename)); }
tracepoint:syscalls:sys_enter_open /uid == 33 && comm == "COMM" && (args->flags & 64)/
{ printf("%d %s open %s\n", pid, comm, str(args->filename)); }
tracepoint:syscalls:sys_enter_creat /uid == 33 && comm == "COMM"/
{ printf("%d %s creat %s\n", pid, comm, str(args->pathname)); }
tracepoint:syscalls:sys_enter_rename /uid == 33 && comm == "COMM"/
{ printf("%d %s rename %s %s\n", pid, comm, str(args->oldname), str(args->newname)); }
tracepoint:syscalls:sys_enter_renameat /uid == 33 && comm == "COMM"/
{ printf("%d %s renameat %s %s\n", pid, comm, str(args->oldname), str(args->newname)); }
tracepoint:syscalls:sys_enter_renameat2 /uid == 33 && comm == "COMM"/
{ printf("%d %s renameat2 %s %s\n", pid, comm, str(args->oldname), str(args->newname)); }
tracepoint:syscalls:sys_enter_mkdir /uid == 33 && comm == "COMM"/
{ printf("%d %s mkdir %s\n", pid, comm, str(args->pathname)); }
tracepoint:syscalls:sys_enter_mkdirat /uid == 33 && comm == "COMM"/
{ printf("%d %s mkdirat %s\n", pid, comm, str(args->pathname)); }
""".replace("COMM", COMM)


class Bpftrace(Sensor):
    name = "bpftrace"

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        if not os.path.exists("/sys/kernel/tracing/events") and not os.path.exists(
            "/sys/kernel/debug/tracing/events"
        ):
            c.sh("mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing", check=False)
            if not os.path.exists("/sys/kernel/tracing/events"):
                c.sh("mount", "-t", "debugfs", "nodev", "/sys/kernel/debug", check=False)
        self.prog = os.path.join(tmp, "peers.bt")
        with open(self.prog, "w", encoding="ascii") as f:
            f.write(BPF)

    def start(self, k: int) -> None:
        self.out = os.path.join(self.tmp, f"bpftrace-{k}.txt")
        self.log = os.path.join(self.tmp, f"bpftrace-{k}.log")
        open(self.log, "w").close()
        env = {**os.environ, "BPFTRACE_STRLEN": "128"}
        self.proc = _popen(["bpftrace", "-o", self.out, self.prog], self.log, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("bpftrace exited: " + open(self.log).read()[-800:])
            if os.path.exists(self.out) and "Attaching" in open(self.out, errors="replace").read(200):
                time.sleep(0.5)
                return
            time.sleep(0.1)
        raise RuntimeError("bpftrace did not attach: " + open(self.log).read()[-800:])

    def stop(self, expected: int) -> dict[str, Any]:
        time.sleep(0.5)
        procs.stop(self.proc, signal.SIGINT)
        n = 0
        lost = 0
        with open(self.out, encoding="utf-8", errors="replace") as f:
            for line in f:
                if f" {COMM} " in line:
                    n += 1
                m = re.search(r"Lost (\d+) events", line)
                if m:
                    lost += int(m.group(1))
        with open(self.log, encoding="utf-8", errors="replace") as f:
            for m in re.finditer(r"Lost (\d+) events", f.read()):
                lost += int(m.group(1))
        return {"seen": n, "lost_reported": lost}


class Floor(Sensor):
    name = "floor"

    def __init__(self, tmp: str, mnt: str) -> None:
        self.tmp, self.mnt = tmp, mnt
        self.script = os.path.join(tmp, "floor.py")
        with open(self.script, "w", encoding="ascii") as f:
            f.write(FLOOR)

    def start(self, k: int) -> None:
        self.log = os.path.join(self.tmp, f"floor-{k}.log")
        open(self.log, "w").close()
        self.proc = _popen([sys.executable, self.script, self.mnt, c.ROOT], self.log)
        _wait_for(self.log, "ready", self.proc)

    def stop(self, expected: int) -> dict[str, Any]:
        time.sleep(0.5)  # let it drain what the kernel still holds
        procs.stop(self.proc)
        with open(self.log, encoding="utf-8") as f:
            m = re.search(r"seen (\d+) overflows (\d+)", f.read())
        return {"seen": int(m.group(1)) if m else None, "overflows": int(m.group(2)) if m else None}


class Rarewrite(Sensor):
    name = "rarewrite"

    def __init__(self, tmp: str, url: str, mnt: str) -> None:
        self.tmp, self.url, self.mnt = tmp, url, mnt

    def start(self, k: int) -> None:
        self.state = os.path.join(self.tmp, f"agent-{k}")
        self.proc = c.start_agent(self.tmp, self.url, self.state, self.mnt, tag=f"agent-{k}")

    def stop(self, expected: int) -> dict[str, Any]:
        try:
            _st, latency = c.wait_counter(self.state, expected, 120)
            if latency is None:
                time.sleep(2)
        finally:
            procs.stop(self.proc)
        cnt = c.status(self.state).get("counters", {})
        return {
            "seen": cnt.get("matched"),
            "read": cnt.get("seen"),
            "overflows": cnt.get("overflows"),
            "dropped": cnt.get("dropped"),
            "matched_within_s": latency,
        }


def ensure_installed(tools: list[str], quick: bool) -> dict[str, str]:
    """Which tools cannot run, and why; installs missing ones with apt-get unless quick."""
    why: dict[str, str] = {}
    missing = [t for t in tools if t in BINARY and shutil.which(BINARY[t]) is None]
    if missing and not quick and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, env=env)
        r = subprocess.run(
            ["apt-get", "install", "-y", "-q", *[APT[t] for t in missing]],
            check=False,
            capture_output=True,
            text=True,
            env=env,
        )
        if r.returncode != 0:
            print(f"apt-get install failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
    for t in tools:
        if t in BINARY and shutil.which(BINARY[t]) is None:
            why[t] = "not installed" + (
                " (--quick does not install)" if quick else " (apt-get install failed)"
            )
    return why


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fs", choices=("tmpfs", "ext4"), default="tmpfs", help="scratch filesystem (tmpfs)")
    ap.add_argument("--files", type=int, default=100_000, help="files per run (default 100,000)")
    ap.add_argument("--dirs", type=int, default=100, help="new directories per run (default 100)")
    ap.add_argument("--pairs", type=int, default=5, help="alternating pairs per tool (default 5)")
    ap.add_argument(
        "--collector", choices=("stub", "real"), default="stub", help="where rarewrite ships (default stub)"
    )
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma list of {', '.join(TOOLS)}")
    ap.add_argument("--quick", action="store_true", help="tiny burst (2,000 files, 10 dirs), 1 pair, no apt")
    a = ap.parse_args()
    if a.quick:
        a.files, a.dirs, a.pairs = 2000, 10, 1
    m = c.machine()
    c.print_machine(m)
    if os.geteuid() != 0:
        print("needs root (mount, fanotify, audit, BPF, setpriv)")
        return 2
    tools = [t for t in a.tools.split(",") if t]
    skipped = ensure_installed(tools, a.quick)
    tmp = tempfile.mkdtemp(prefix="rw-peers-")
    os.chmod(tmp, 0o755)  # noqa: S103 - www-data runs the writer from here
    py = os.path.realpath("/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
    exe = os.path.join(tmp, COMM)
    shutil.copy2(py, exe)  # its own executable path and comm (see the docstring)
    script = os.path.join(tmp, "writer.py")
    with open(script, "w", encoding="ascii") as f:
        f.write(WRITER)
    os.chmod(script, 0o644)
    writer = [exe, script]
    expected = a.files + a.files // 10 + a.dirs
    runs: list[dict[str, Any]] = []
    target = None
    sensors: dict[str, Sensor] = {}
    try:
        target = c.Target(a.fs, max(256, a.files // 100 * 4), "peers")
        signal.signal(signal.SIGTERM, _terminate)  # run the finally below (audit rules, mounts)
        with (c.stub_collector if a.collector == "stub" else c.real_collector)(tmp) as url:
            for t in tools:
                if t in skipped:
                    continue
                try:
                    if t == "auditd":
                        sensors[t] = Auditd(tmp, exe)
                    elif t == "fatrace":
                        sensors[t] = Fatrace(tmp, target.mnt)
                    elif t == "bpftrace":
                        sensors[t] = Bpftrace(tmp)
                    elif t == "floor":
                        sensors[t] = Floor(tmp, target.mnt)
                    elif t == "rarewrite":
                        sensors[t] = Rarewrite(tmp, url, target.mnt)
                    else:
                        skipped[t] = "unknown tool"
                        continue
                    # one untimed probe run: the tool must start and see events here
                    sensors[t].start(-1)
                    root = os.path.join(target.mnt, f"probe-{t}")
                    c.workload([*c.AS_WWW, *writer], root, 20, 2)
                    got = sensors[t].stop(20 + 2 + 2)
                    shutil.rmtree(root)
                    if not got.get("seen"):
                        raise RuntimeError(f"saw no event of a 20-file probe: {got}")
                except Exception as e:  # noqa: BLE001 - a peer that cannot run here is skipped with the reason
                    skipped[t] = f"{type(e).__name__}: {e}"[:400]
                    s = sensors.pop(t, None)
                    if isinstance(s, Auditd):
                        s.close()
            for k in range(a.pairs):
                for t, s in sensors.items():
                    order = ("none", t) if k % 2 == 0 else (t, "none")
                    for mode in order:
                        root = os.path.join(target.mnt, f"run-{k}-{t}-{mode}")
                        if mode != "none":
                            s.start(k)
                        w = c.workload([*c.AS_WWW, *writer], root, a.files, a.dirs)
                        extra = s.stop(expected) if mode != "none" else {}
                        r = {"pair": k, "tool": t, "mode": mode, **w, **extra}
                        runs.append(r)
                        shutil.rmtree(root)
                        print(
                            f"  pair {k} {t:9s} {mode:9s} wall {w['wall_s']:.3f} s"
                            + (f" seen {extra.get('seen')}/{expected}" if extra else ""),
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        for s in sensors.values():
            if isinstance(s, Auditd):
                s.close()
        if target is not None:
            target.close()
        shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, Any] = {}
    rows = []
    for t in sensors:
        base = {r["pair"]: r for r in runs if r["tool"] == t and r["mode"] == "none"}
        with_t = {r["pair"]: r for r in runs if r["tool"] == t and r["mode"] == t}
        ratios = [with_t[k]["wall_s"] / base[k]["wall_s"] for k in sorted(with_t)]
        seen = [r.get("seen") for r in with_t.values()]
        summary[t] = {
            "ratio_median": c.median(ratios),
            "ratios": ratios,
            "wall_none_median_s": c.median([r["wall_s"] for r in base.values()]),
            "wall_tool_median_s": c.median([r["wall_s"] for r in with_t.values()]),
            "seen_min": min((x for x in seen if x is not None), default=None),
            "seen_max": max((x for x in seen if x is not None), default=None),
            "expected": expected,
            # what the tool can report at all: fatrace -f C shows file creations only
            "expected_visible": a.files if t == "fatrace" else expected,
            "lacks": LACKS[t],
        }
        for key in ("lost_reported", "overflows"):
            vals = [int(r[key]) for r in with_t.values() if r.get(key) is not None]
            if vals:
                summary[t][key + "_total"] = sum(vals)
        st = summary[t]
        seen_range = f"{st['seen_min']}-{st['seen_max']}"
        rows.append([t, st["ratio_median"], min(ratios), max(ratios), st["wall_none_median_s"],
                     st["wall_tool_median_s"], seen_range, st["expected_visible"]])  # fmt: skip
    print(
        f"burst on {a.fs}: {a.files} files in {a.dirs} new dirs, {a.files // 10} renames ({expected} events "
        f"per run), writer {COMM} (python copy) as www-data; {a.pairs} alternating pairs per tool; "
        f"rarewrite ships to the {a.collector} collector"
    )
    c.table(["tool", "ratio", "min", "max", "none s", "tool s", "seen", "visible"], rows)
    for t in sensors:
        print(f"  {t:9s} lacks: {LACKS[t]}")
    for t, why in skipped.items():
        print(f"  {t:9s} SKIPPED: {why}")
    c.emit(
        {
            "bench": "peers",
            "machine": m,
            "quick": a.quick,
            "fs": a.fs,
            "collector": a.collector,
            "files": a.files,
            "dirs": a.dirs,
            "pairs": a.pairs,
            "expected_per_run": expected,
            "summary": summary,
            "skipped": skipped,
            "runs": runs,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
