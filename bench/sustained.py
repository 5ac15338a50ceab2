#!/usr/bin/env python3
"""A fixed rate of matching events for a while, the agent held to its unit's limits (issue 18).

Root only. One writer, a task named ``php-fpm8.2`` running as www-data (as
bench/burst.py makes it), makes ``--rate`` matching events a second (default
20,000) for ``--seconds`` (default 60) on a fresh tmpfs under /srv: new files
in new directories of 1,000, every tenth written as ``.tmp`` and renamed
(two events), each name carrying its write time in ms. Paced every 10 ms.
Every path is new, so every event is a detailed one (facts and enrichment).
``--both-rules``: the files are ``.php`` under an ``uploads/`` directory, so
every event matches the new-terms rule too, not only the first one.

The agent (``rarewrite agent run``, started as burst.py starts it) runs in a
child cgroup with the unit's limits: CPUQuota=20% (cpu.max "20000 100000",
or cfs_quota_us 20000 on a cgroup v1 host) and MemoryMax=200M, made directly
under /sys/fs/cgroup (v2, or v1's cpu, cpuacct and memory hierarchies: this
script picks what the host has; it does not need systemd). It ships to a stub
collector (burst.py's: enrolls, answers 200, stores nothing) that also
decodes each batch and notes, per batch, when it arrived and the write times
of its newest and oldest record: the latency from the write to the
collector having it.

Every second: events written, the agent's seen and matched, the backlog
(written minus seen: the kernel's queue and the read-ahead, whose depth the
kernel does not tell; the status is written once a second, so its seen is
set against what the writer had written at the status's time, to 0.1 s),
the read-ahead bytes, overflows, the cgroup's CPU
(usage and throttled time in that second), memory, and the latency of the
batches that arrived. Then a summary: agent CPU per event (the cgroup's
whole usage from start to everything shipped, divided by the events), the
drain time after the writer stops, latency percentiles, and whether the rate
was sustained (no overflow, no loss, and the backlog not growing: its median
over the last quarter of the run is at most one second of events).

``--against DIR`` runs another checkout's agent too, alternating in the same
run (``--pairs``, order flipped every pair). ``--quick``: a 3 s smoke test at
500 events/s. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import _common as c

from tests.support import procs

CGROOT = "/sys/fs/cgroup"
CPU_MAX = (20000, 100000)  # CPUQuota=20%
MEMORY_MAX = 200 << 20  # MemoryMax=200M

WRITER = r"""
import json, os, sys, time
root, rate, seconds, both = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
base, ext = (os.path.join(root, "uploads"), ".php") if both else (root, ".html")
events = files = renames = dirs = 0
if both:
    os.mkdir(base)
    events += 1
goal = int(rate * seconds)
t0 = time.monotonic()
report = t0 + 0.1
d = base
while events < goal:
    now = time.monotonic()
    due = min(goal, int((now - t0) * rate) + 1)
    while events < due:
        if files % 1000 == 0:
            d = f"{base}/d{files // 1000:05d}"
            os.mkdir(d)
            dirs += 1
            events += 1
        name = f"{d}/f{files:08d}-{time.time_ns() // 1000000}"
        if files % 10 == 0:
            fd = os.open(name + ".tmp", flags, 0o644)
            os.write(fd, b"<?php ?>\n")
            os.close(fd)
            os.rename(name + ".tmp", name + ext)
            renames += 1
            events += 2
        else:
            os.close(os.open(name + ext, flags, 0o644))
            events += 1
        files += 1
    if now >= report:
        print(json.dumps({"t": now - t0, "ms": time.time_ns() // 1000000, "events": events}), flush=True)
        report += 0.1
    time.sleep(max(0.0, 0.01 - (time.monotonic() - now)))
end = {"t": time.monotonic() - t0, "ms": time.time_ns() // 1000000, "events": events}
print(json.dumps({**end, "files": files, "renames": renames, "dirs": dirs, "done": True}), flush=True)
"""

# burst.py's stub, and per batch one line: arrival ms, records, write ms of the newest and oldest
STUB = (
    c.STUB.replace(
        '            self._reply(b\'{"status": "stored"}\')',
        '            self._note(body)\n            self._reply(b\'{"status": "stored"}\')',
    )
    .replace(
        '        n = int(self.headers.get("Content-Length") or 0)\n'
        "        while n > 0:\n"
        "            got = self.rfile.read(min(n, 1 << 20))\n"
        "            if not got:\n"
        "                break\n"
        "            n -= len(got)\n",
        '        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))\n',
    )
    .replace(
        "    def _reply(self, body):",
        r"""    def _note(self, body):
        import msgpack, time
        at = time.time_ns() // 1000000
        doc = msgpack.unpackb(body, raw=False)
        paths = [e.get("path") for e in doc.get("events", [])]
        n = len(paths)
        for exe, path, times in doc.get("counts", []):
            paths.append(path)
            n += len(times) if isinstance(times, list) else 1
        ms = []
        for p in paths:
            tail = (p or b"").rsplit(b"-", 1)[-1].split(b".")[0]
            if tail.isdigit():
                ms.append(int(tail))
        line = {"at": at, "n": n, "newest": max(ms) if ms else None, "oldest": min(ms) if ms else None}
        with open(sys.argv[2], "a") as f:
            f.write(json.dumps(line) + "\n")

    def _reply(self, body):""",
    )
)


@contextlib.contextmanager
def stub(tmp: str) -> Iterator[tuple[str, str]]:
    """The noting stub collector: (its URL, the file of its batch lines)."""
    port = procs.free_port()
    notes = os.path.join(tmp, "batches.ndjson")
    open(notes, "w").close()
    with open(os.path.join(tmp, "stub.log"), "ab") as log:
        p = subprocess.Popen(
            [sys.executable, "-c", STUB, str(port), notes], stdout=log, stderr=log, start_new_session=True
        )
    try:
        c.wait_port(port, p)
        yield f"http://127.0.0.1:{port}", notes
    finally:
        procs.stop(p)


class Cgroup:
    """A child cgroup with the unit's CPU and memory limits: cgroup v2 when
    the host has it mounted with controllers at /sys/fs/cgroup, else v1's
    cpu, cpuacct and memory hierarchies."""

    def __init__(self, name: str) -> None:
        self.v2 = os.path.exists(os.path.join(CGROOT, "cgroup.controllers"))
        if self.v2:
            with open(os.path.join(CGROOT, "cgroup.subtree_control"), "w") as f:
                f.write("+cpu +memory")
            self.dirs = {k: os.path.join(CGROOT, name) for k in ("cpu", "cpuacct", "memory")}
        else:
            self.dirs = {k: os.path.join(CGROOT, k, name) for k in ("cpu", "cpuacct", "memory")}
        for d in set(self.dirs.values()):
            os.makedirs(d, exist_ok=True)
        if self.v2:
            self._write("cpu", "cpu.max", f"{CPU_MAX[0]} {CPU_MAX[1]}")
            self._write("memory", "memory.max", str(MEMORY_MAX))
        else:
            self._write("cpu", "cpu.cfs_period_us", str(CPU_MAX[1]))
            self._write("cpu", "cpu.cfs_quota_us", str(CPU_MAX[0]))
            self._write("memory", "memory.limit_in_bytes", str(MEMORY_MAX))

    def _write(self, kind: str, name: str, value: str) -> None:
        with open(os.path.join(self.dirs[kind], name), "w") as f:
            f.write(value)

    def _read(self, kind: str, name: str) -> str:
        with open(os.path.join(self.dirs[kind], name)) as f:
            return f.read()

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the cgroup from its first instruction."""
        procs_files = " ".join(os.path.join(d, "cgroup.procs") for d in sorted(set(self.dirs.values())))
        script = f'for f in {procs_files}; do echo $$ > "$f" || exit 97; done; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *argv]

    def sample(self) -> dict[str, float]:
        """CPU used and throttled (s), times throttled, memory now and peak (MB)."""
        stat = dict(line.split() for line in self._read("cpu", "cpu.stat").splitlines() if line.strip())
        if self.v2:
            used = int(stat["usage_usec"]) / 1e6
            throttled = int(stat.get("throttled_usec", 0)) / 1e6
            mem = int(self._read("memory", "memory.current"))
            peak_file = os.path.join(self.dirs["memory"], "memory.peak")
            peak = int(self._read("memory", "memory.peak")) if os.path.exists(peak_file) else mem
        else:
            used = int(self._read("cpuacct", "cpuacct.usage")) / 1e9
            throttled = int(stat.get("throttled_time", 0)) / 1e9
            mem = int(self._read("memory", "memory.usage_in_bytes"))
            peak = int(self._read("memory", "memory.max_usage_in_bytes"))
        return {"cpu_s": used, "throttled_s": throttled, "nr_throttled": float(stat.get("nr_throttled", 0)),
                "mem_mb": mem / (1 << 20), "mem_peak_mb": peak / (1 << 20)}  # fmt: skip

    def remove(self) -> None:
        for d in set(self.dirs.values()):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)  # its last process is still exiting


class Lines(threading.Thread):
    """The writer's JSON lines (every 0.1 s): the newest, and (wall ms, events) of each."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream, self.last, self.done = stream, {"events": 0}, threading.Event()
        self.history: list[tuple[int, int]] = []

    def run(self) -> None:
        for line in self.stream:
            with contextlib.suppress(ValueError):
                self.last = json.loads(line)
                self.history.append((self.last["ms"], self.last["events"]))
        self.done.set()

    def written_at(self, ms: int) -> int:
        """Events written by wall time ``ms`` (to 0.1 s): what the agent's status of then had to see."""
        i = bisect.bisect_right(self.history, (ms, 1 << 62))
        return self.history[i - 1][1] if i else 0


def batches(notes: str, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The stub's batch lines after ``offset``, and the new offset."""
    with open(notes, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return [json.loads(x) for x in data[:end].splitlines() if x.strip()], offset + end


def percentiles(xs: list[float]) -> dict[str, Optional[float]]:
    return {"p50": pct(xs, 0.5), "p99": pct(xs, 0.99), "max": max(xs, default=None)}


def pct(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def one_run(tmp: str, url: str, notes: str, target: str, a: argparse.Namespace, tag: str) -> dict[str, Any]:
    """One agent (this checkout's or --against's) under the limits, one writer at the rate."""
    state = os.path.join(tmp, f"state-{tag}")
    root = os.path.join(target, f"run-{tag}")
    os.mkdir(root)
    shutil.chown(root, 33, 33)
    cg = Cgroup(f"rw-sustained-{os.getpid()}-{tag}")
    try:
        command = cg.wrap(c.rarewrite_of(a.against if tag.startswith("against") else None))
        agent = c.start_agent(tmp, url, state, target, tag=tag, command=command)
        try:
            return measure(cg, agent, state, root, notes, a)
        finally:
            procs.stop(agent)
    finally:
        cg.remove()
        shutil.rmtree(root, ignore_errors=True)


def measure(
    cg: Cgroup, agent: subprocess.Popen[bytes], state: str, root: str, notes: str, a: argparse.Namespace
) -> dict[str, Any]:
    """The per-second table while the writer runs and the agent drains; the run's summary."""
    _, offset = batches(notes, 0)
    base = cg.sample()
    cnt0 = c.status(state).get("counters", {})
    seen0, matched0 = cnt0.get("seen", 0), cnt0.get("matched", 0)
    w = subprocess.Popen(
        [*a.writer, root, str(a.rate), str(a.seconds), "1" if a.both_rules else "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = Lines(w.stdout)
    lines.start()
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    lat_new: list[float] = []
    lat_old: list[float] = []
    prev, written_at_end, drained_at = base, None, None
    deadline = t0 + a.seconds + a.drain_timeout
    while time.monotonic() < deadline:
        time.sleep(max(0.0, t0 + len(rows) + 1 - time.monotonic()))
        st = c.status(state)
        cnt = st.get("counters", {})
        got, offset = batches(notes, offset)
        now = cg.sample()
        written = int(lines.last.get("events", 0))
        seen, matched = cnt.get("seen", 0) - seen0, cnt.get("matched", 0) - matched0
        # the status is written once a second: its seen against what was written by then
        backlog = lines.written_at(int(st.get("updated_ms", 0))) - seen
        arrived = [b for b in got if b["newest"] is not None]
        lat_new += [b["at"] - b["newest"] for b in arrived]
        lat_old += [b["at"] - b["oldest"] for b in arrived]
        rows.append({
            "t": round(time.monotonic() - t0, 2), "written": written, "seen": seen, "matched": matched,
            "backlog": backlog, "read_ahead_kb": st.get("source", {}).get("read_ahead_bytes", 0) // 1024,
            "overflows": cnt.get("overflows", 0), "outbox": st.get("outbox_depth"),
            "cpu_ms": (now["cpu_s"] - prev["cpu_s"]) * 1e3,
            "throttled_ms": (now["throttled_s"] - prev["throttled_s"]) * 1e3,
            "mem_mb": now["mem_mb"], "batches": len(got), "shipped": sum(b["n"] for b in got),
            "lat_newest_ms": max((b["at"] - b["newest"] for b in arrived), default=None),
            "lat_oldest_ms": max((b["at"] - b["oldest"] for b in arrived), default=None),
        })  # fmt: skip
        prev = now
        if a.verbose:
            print_row(rows[-1])
        if lines.done.is_set() and written_at_end is None:
            written_at_end = rows[-1]
        if written_at_end is not None and matched >= written and st.get("outbox_depth", 1) == 0:
            drained_at = time.monotonic() - t0
            break
        if lost_for_good(rows, written_at_end):
            break
    w.wait(30)
    final = lines.last
    return summary(rows, final, written_at_end, drained_at, cg.sample(), base, lat_new, lat_old, a)


def lost_for_good(rows: list[dict[str, Any]], at_end: Optional[dict[str, Any]]) -> bool:
    """The writer is done, nothing is read ahead or waits in the outbox, and
    matched has not moved for 5 s: what is missing was dropped by the kernel."""
    if at_end is None or len(rows) < 6:
        return False
    last = rows[-6:]
    return (
        all(r["matched"] == last[-1]["matched"] and r["read_ahead_kb"] == 0 for r in last)
        and not last[-1]["outbox"]
    )


def print_row(r: dict[str, Any]) -> None:
    print(
        f"  t={r['t']:6.1f} written={r['written']:8d} seen={r['seen']:8d} matched={r['matched']:8d} "
        f"backlog={r['backlog']:7d} ahead={r['read_ahead_kb']:6d}KB ovfl={r['overflows']} "
        f"outbox={r['outbox']} "
        f"cpu={r['cpu_ms']:6.1f}ms thr={r['throttled_ms']:6.1f}ms mem={r['mem_mb']:5.1f}MB "
        f"lat new/old={r['lat_newest_ms']}/{r['lat_oldest_ms']}ms",
        file=sys.stderr,
        flush=True,
    )


def summary(
    rows: list[dict[str, Any]],
    final: dict[str, Any],
    at_end: Optional[dict[str, Any]],
    drained_at: Optional[float],
    last: dict[str, float],
    base: dict[str, float],
    lat_new: list[float],
    lat_old: list[float],
    a: argparse.Namespace,
) -> dict[str, Any]:
    events = int(final.get("events", 0))
    tail = [r["backlog"] for r in rows if r["t"] <= a.seconds][-max(1, int(a.seconds / 4)) :]
    cpu = last["cpu_s"] - base["cpu_s"]
    matched = rows[-1]["matched"] if rows else 0
    overflows = rows[-1]["overflows"] if rows else 0
    backlog_tail = c.median(tail) or 0
    return {
        "events": events,
        "files": final.get("files"),
        "writer_s": final.get("t"),
        "rate_achieved": events / final["t"] if final.get("t") else None,
        "matched": matched,
        "lost": events - matched,
        "overflows": overflows,
        "backlog_max": max((r["backlog"] for r in rows), default=None),
        "backlog_last_quarter_median": backlog_tail,
        "backlog_at_writer_end": at_end["backlog"] if at_end else None,
        "drained_after_writer_s": drained_at - final["t"] if drained_at and final.get("t") else None,
        "cpu_s": cpu,
        "cpu_us_per_event": cpu / events * 1e6 if events else None,
        "cpu_us_per_matched_event": cpu / matched * 1e6 if matched else None,
        "cpu_share_while_writing": c.median([r["cpu_ms"] / 1000 for r in rows if r["t"] <= a.seconds]),
        "throttled_s": last["throttled_s"] - base["throttled_s"],
        "mem_peak_mb": last["mem_peak_mb"],
        "latency_newest_ms": percentiles(lat_new),
        "latency_oldest_ms": percentiles(lat_old),
        "sustained": overflows == 0 and events == matched and backlog_tail <= a.rate,
        "seconds": rows,
    }  # fmt: skip


def print_summary(name: str, s: dict[str, Any]) -> None:
    ln, lo = s["latency_newest_ms"], s["latency_oldest_ms"]
    print(
        f"{name}: {s['events']} events in {s['writer_s']:.1f} s ({s['rate_achieved']:.0f}/s), matched "
        f"{s['matched']}, lost {s['lost']}, overflows {s['overflows']}; backlog max {s['backlog_max']}, "
        f"last quarter {s['backlog_last_quarter_median']}, at writer end {s['backlog_at_writer_end']}; "
        f"drained {s['drained_after_writer_s']} s after; cpu {s['cpu_us_per_event']:.2f} us/event "
        f"({s['cpu_us_per_matched_event']:.2f} per matched) "
        f"({s['cpu_s']:.2f} s, share while writing {s['cpu_share_while_writing']}), throttled "
        f"{s['throttled_s']:.2f} s; mem peak {s['mem_peak_mb']:.1f} MB; latency newest p50/p99/max "
        f"{ln['p50']}/{ln['p99']}/{ln['max']} ms, oldest {lo['p50']}/{lo['p99']}/{lo['max']} ms; "
        f"sustained {s['sustained']}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=20_000, help="matching events a second (default 20,000)")
    ap.add_argument("--seconds", type=float, default=60, help="how long the writer writes (default 60)")
    ap.add_argument("--drain-timeout", type=float, default=120, help="max wait after the writer (s)")
    ap.add_argument("--pairs", type=int, default=1, help="alternating runs of each agent (default 1)")
    ap.add_argument("--against", metavar="DIR", help="also run another checkout's agent, alternating")
    ap.add_argument("--both-rules", action="store_true", help="events that match the new-terms rule too")
    ap.add_argument("--quiet", dest="verbose", action="store_false", help="no per-second lines on stderr")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 s at 500 events/s")
    a = ap.parse_args()
    if a.quick:
        a.rate, a.seconds, a.drain_timeout, a.pairs = 500, 3, 60, 1
    m = c.machine()
    c.print_machine(m)
    if os.geteuid() != 0:
        print("needs root (mount, fanotify, setpriv, cgroups)")
        return 2
    tmp = tempfile.mkdtemp(prefix="rw-sustained-")
    a.writer = c.burst_writer(tmp, "php-fpm8.2", code=WRITER)
    results: dict[str, list[dict[str, Any]]] = {"agent": [], "against": []}
    target = None
    try:
        target = c.Target("tmpfs", max(256, int(a.rate * a.seconds) // 250), "sustained")
        with stub(tmp) as (url, notes):
            modes = ("agent", "against") if a.against else ("agent",)
            for k in range(a.pairs):
                for mode in modes if k % 2 == 0 else modes[::-1]:
                    r = one_run(tmp, url, notes, target.mnt, a, f"{mode}-{k}")
                    results[mode].append(r)
                    print_summary(f"  pair {k} {mode}", {**r})
    finally:
        if target is not None:
            target.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"sustained on tmpfs: {a.rate:.0f} matching events/s for {a.seconds:.0f} s, writer php-fpm8.2 "
        f"(python) as www-data, {'both rules' if a.both_rules else 'the first rule'}, agent under cpu.max "
        f"{CPU_MAX[0]}/{CPU_MAX[1]} and {MEMORY_MAX >> 20} MB, collector stub"
    )
    out = {}
    for mode in ("agent", "against") if a.against else ("agent",):
        runs = results[mode]
        med = {k: c.median([r[k] for r in runs if r[k] is not None]) for k in
               ("cpu_us_per_event", "cpu_us_per_matched_event", "backlog_last_quarter_median",
                "drained_after_writer_s")}  # fmt: skip
        out[mode] = {"median": med, "sustained_all": all(r["sustained"] for r in runs),
                     "lost_total": sum(r["lost"] for r in runs),
                     "overflows_total": sum(r["overflows"] for r in runs)}  # fmt: skip
        where = a.against if mode == "against" else c.ROOT
        print(f"{mode}: {where}: median cpu {med['cpu_us_per_event']} us/event "
              f"({med['cpu_us_per_matched_event']} per matched); sustained {out[mode]['sustained_all']}; "
              f"lost {out[mode]['lost_total']}")  # fmt: skip
    c.emit(
        {
            "bench": "sustained",
            "machine": m,
            "quick": a.quick,
            "rate": a.rate,
            "seconds": a.seconds,
            "both_rules": a.both_rules,
            "cgroup": "v2" if os.path.exists(os.path.join(CGROOT, "cgroup.controllers")) else "v1",
            "against": a.against,
            "summary": out["agent"],
            "summary_against": out.get("against"),
            "runs": {k: [{kk: vv for kk, vv in r.items()} for r in v] for k, v in results.items() if v},
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
