#!/usr/bin/env python3
"""Worst-case burst, every event matches (issue 7, simplified): agent vs no sensor.

Root only. One web-server-named process running as www-data (a symlink named
``php-fpm8.2`` to the Python interpreter, so the kernel calls the task
php-fpm8.2) creates D new directories and F files in them on a scratch
filesystem, and for every 10th file writes ``<name>.tmp`` and renames it to
``<name>.php``. All work is in that ONE process (no mkdir/mv children).
Matching events per run: F creations + F/10 renames + D directory creations.

Alternating pairs (order flipped every pair) of: no sensor, and
``rarewrite agent run --watch TARGET``. The agent ships to ``--collector``:
``stub`` (default) is a minimal HTTP server in its own process that enrolls
and answers 200 to every batch without storing it, so the 2 cores are shared
by the workload and the agent only (issue 7 measures the agent); ``real``
runs ``rarewrite collector serve`` on this host too (its ingest then
competes with the workload for the cores). Either way the agent stores
every event in its SQLite outbox before anything is acknowledged.

``--writer``: ``www-data`` (default; every event matches), ``root`` (the
same php-fpm8.2 writer as root: the user predicate fails) or ``other`` (as
www-data, but the task is named ``batchjob``: the process predicate fails).
For the non-matching writers the run waits for ``seen`` (not ``matched``)
to cover every event and reports agent CPU per event. Per run: the writer's own wall time for the
workload; for agent runs the status counters (seen, matched, overflows,
dropped, stored), the seconds from the workload's end until ``matched``
covers every event, agent CPU seconds (utime+stime of all its threads, from
just before the workload until then) per event, and agent RSS (VmRSS sampled
every 50 ms, max; VmHWM; VmRSS once everything is matched; and VmRSS "steady":
once the outbox is empty and the agent's idle release has run).

``--against DIR`` adds a third mode to every pair: the agent of another
checkout (for example ``git worktree add /tmp/rw-old HEAD~1``), run by this
venv's interpreter, so the two agents are compared side by side in one run.

Target: a fresh tmpfs mounted under /srv (default), or with ``--fs ext4`` a
loop-device ext4 image made by mkfs.ext4 in /var/tmp. Unmounted and removed
in a finally.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import _common as c

from agent.sensor.runtime import IDLE_RELEASE_S
from tests.support import procs


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.max_kb, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.max_kb = max(self.max_kb, c.proc_rss_kb(self.pid))
            except OSError:
                return
            self.stop.wait(0.05)


def agent_run(
    tmp: str, url: str, target: str, root: str, writer: list[str], a: argparse.Namespace, k: int, mode: str
) -> dict[str, Any]:
    state = os.path.join(tmp, f"{mode}-{k}")
    command = c.rarewrite_of(a.against if mode == "against" else None)
    agent = c.start_agent(tmp, url, state, target, tag=f"{mode}-{k}", command=command)
    try:
        spy = None
        if (
            a.profile and k == 0 and mode == "agent"
        ):  # the first agent run only: py-spy slows the agent it samples
            spy = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid", str(agent.pid),
                 "--rate", "250", "--format", "raw", "--output", a.profile, "--nonblocking", "--threads"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
        sampler = RssSampler(agent.pid)
        sampler.start()
        rss_idle = c.proc_rss_kb(agent.pid)
        cpu0 = c.proc_cpu_s(agent.pid)
        w = c.workload(writer, root, a.files, a.dirs)
        expected = w["files"] + w["renames"] + w["dirs"]
        # seen also counts the run's root directory, made by this script (root, python) in scope
        want = expected + (1 if a.wait_key == "seen" else 0)
        st, latency = c.wait_counter(state, want, a.settle_timeout, key=a.wait_key)
        cpu1 = c.proc_cpu_s(agent.pid)
        if latency is None:  # not everything matched: let the counters settle before reading them
            time.sleep(2)
            st = c.status(state)
        sampler.stop.set()
        sampler.join()
        rss_after = c.proc_rss_kb(agent.pid)
        hwm = c.proc_rss_kb(agent.pid, "VmHWM")
        # steady: everything shipped, then the agent's idle release (IDLE_RELEASE_S) has run
        deadline = time.monotonic() + a.settle_timeout
        while c.status(state).get("outbox_depth", 0) != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu_all = c.proc_cpu_s(agent.pid)  # facts, enrichment and shipping too: all an event costs
        time.sleep(IDLE_RELEASE_S + 1.5)
        rss_steady = c.proc_rss_kb(agent.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
    finally:
        procs.stop(agent)
    final = c.status(state)
    cnt = final.get("counters", st.get("counters", {}))
    return {
        **w,
        "expected": expected,
        "seen": cnt.get("seen"),
        "matched": cnt.get("matched"),
        "stored": cnt.get("stored"),
        "overflows": cnt.get("overflows"),
        "dropped": cnt.get("dropped"),
        "unknown": cnt.get("unknown"),
        "ship_records_sent": cnt.get("ship_records_sent"),
        "outbox_depth_at_exit": final.get("outbox_depth"),
        "lost": want - (cnt.get(a.wait_key) or 0),
        "prefiltered": final.get("source", {}).get("prefiltered"),
        "matched_within_s": latency,
        "cpu_s": cpu1 - cpu0,
        "cpu_us_per_event": (cpu1 - cpu0) / expected * 1e6,
        "cpu_all_us_per_event": (cpu_all - cpu0) / expected * 1e6,
        "rss_idle_mb": rss_idle / 1024,
        "rss_max_sampled_mb": sampler.max_kb / 1024,
        "rss_hwm_mb": hwm / 1024,
        "rss_after_mb": rss_after / 1024,
        "rss_steady_mb": rss_steady / 1024,
    }


def summarize(base: dict[int, Any], ag: dict[int, Any], wait_key: str) -> dict[str, Any]:
    """Print one agent's per-pair table and summary line; return the summary."""
    ratios = [ag[k]["wall_s"] / base[k]["wall_s"] for k in sorted(ag)]
    c.table(
        ["pair", "none s", "agent s", "ratio", "seen", "matched", "lost", "ovfl", "drop", "match@s",
         "cpu us/ev", "all us/ev", "rss max MB", "rss after MB", "rss steady MB"],
        [
            [k, base[k]["wall_s"], ag[k]["wall_s"], ratios[i], ag[k]["seen"], ag[k]["matched"], ag[k]["lost"],
             ag[k]["overflows"], ag[k]["dropped"], ag[k]["matched_within_s"], ag[k]["cpu_us_per_event"],
             ag[k]["cpu_all_us_per_event"], ag[k]["rss_max_sampled_mb"], ag[k]["rss_after_mb"],
             ag[k]["rss_steady_mb"]]
            for i, k in enumerate(sorted(ag))
        ],
    )  # fmt: skip
    lat = [r["matched_within_s"] for r in ag.values()]
    summary = {
        "ratio_median": c.median(ratios),
        "ratios": ratios,
        "wall_none_median_s": c.median([r["wall_s"] for r in base.values()]),
        "wall_agent_median_s": c.median([r["wall_s"] for r in ag.values()]),
        "events_per_run": next(iter(ag.values()))["expected"],
        "lost_total": sum(r["lost"] for r in ag.values()),
        "overflows_total": sum(r["overflows"] or 0 for r in ag.values()),
        "dropped_total": sum(r["dropped"] or 0 for r in ag.values()),
        "matched_within_s_max": None if None in lat else max(lat),
        "cpu_us_per_event_median": c.median([r["cpu_us_per_event"] for r in ag.values()]),
        "cpu_all_us_per_event_median": c.median([r["cpu_all_us_per_event"] for r in ag.values()]),
        "rss_max_mb": max(r["rss_max_sampled_mb"] for r in ag.values()),
        "rss_after_max_mb": max(r["rss_after_mb"] for r in ag.values()),
        "rss_steady_max_mb": max(r["rss_steady_mb"] for r in ag.values()),
        "rss_idle_max_mb": max(r["rss_idle_mb"] for r in ag.values()),
    }
    print(
        f"median ratio {summary['ratio_median']:.3f}; lost {summary['lost_total']}; "
        f"{wait_key} within {summary['matched_within_s_max']} s; "
        f"cpu {summary['cpu_us_per_event_median']:.1f} us/event; "
        f"rss max {summary['rss_max_mb']:.1f} MB, steady after {summary['rss_steady_max_mb']:.1f} MB "
        f"(idle before {summary['rss_idle_max_mb']:.1f} MB)"
    )
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--fs", choices=("tmpfs", "ext4"), default="tmpfs", help="scratch filesystem (default tmpfs)"
    )
    ap.add_argument("--files", type=int, default=100_000, help="files per run (default 100,000)")
    ap.add_argument("--dirs", type=int, default=100, help="new directories per run (default 100)")
    ap.add_argument("--pairs", type=int, default=5, help="alternating pairs (default 5)")
    ap.add_argument("--settle-timeout", type=float, default=120, help="max wait for matched (s)")
    ap.add_argument(
        "--writer",
        choices=("www-data", "root", "other"),
        default="www-data",
        help="www-data: php-fpm8.2 as www-data, every event matches (default); root: php-fpm8.2 as "
        "root; other: a task named batchjob as www-data (nothing matches)",
    )
    ap.add_argument(
        "--collector",
        choices=("stub", "real"),
        default="stub",
        help="stub: a 200-only HTTP stub (default, measures the agent); real: rarewrite collector serve",
    )
    ap.add_argument("--against", metavar="DIR", help="also run another checkout's agent in every pair")
    ap.add_argument("--profile", metavar="FILE", help="py-spy the first agent run, raw stacks to FILE")
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes (smoke test): 2,000 files, 10 dirs, 1 pair"
    )
    a = ap.parse_args()
    if a.quick:
        a.files, a.dirs, a.pairs = 2000, 10, 1
    m = c.machine()
    c.print_machine(m)
    if os.geteuid() != 0:
        print("needs root (mount, fanotify, setpriv)")
        return 2
    tmp = tempfile.mkdtemp(prefix="rw-burst-")
    name = "batchjob" if a.writer == "other" else "php-fpm8.2"
    writer = c.burst_writer(tmp, name, as_www=a.writer != "root")
    a.wait_key = "matched" if a.writer == "www-data" else "seen"
    size_mb = max(256, a.files // 100 * 4)
    runs: list[dict[str, Any]] = []
    target = None
    try:
        target = c.Target(a.fs, size_mb, "burst")
        with c.stub_collector(tmp) if a.collector == "stub" else c.real_collector(tmp) as url:
            modes = ("none", "agent", "against") if a.against else ("none", "agent")
            for k in range(a.pairs):
                order = modes[k % len(modes) :] + modes[: k % len(modes)]  # rotated every pair
                for mode in order:
                    root = os.path.join(target.mnt, f"run-{k}-{mode}")
                    if mode == "none":
                        r = {"pair": k, "mode": mode, **c.workload(writer, root, a.files, a.dirs)}
                    else:
                        r = {
                            "pair": k,
                            "mode": mode,
                            **agent_run(tmp, url, target.mnt, root, writer, a, k, mode),
                        }
                    runs.append(r)
                    shutil.rmtree(root)
                    print(
                        f"  pair {k} {mode:5s} wall {r['wall_s']:.3f} s"
                        + (f" matched {r['matched']}/{r['expected']}" if mode != "none" else ""),
                        file=sys.stderr,
                    )
    finally:
        if target is not None:
            target.close()
        shutil.rmtree(tmp, ignore_errors=True)
    base = {r["pair"]: r for r in runs if r["mode"] == "none"}
    events = next(r["expected"] for r in runs if r["mode"] == "agent")
    user = "root" if a.writer == "root" else "www-data"
    what = "matching" if a.writer == "www-data" else "NON-matching"
    print(
        f"burst on {a.fs}: {a.files} files in {a.dirs} new dirs, {a.files // 10} renames "
        f"({events} {what} events per run), writer {name} (python) as {user}, {a.pairs} pairs, "
        f"collector {a.collector}"
    )
    summaries = {}
    for mode in ("agent", "against") if a.against else ("agent",):
        print(f"{mode}: {a.against if mode == 'against' else c.ROOT}")
        summaries[mode] = summarize(base, {r["pair"]: r for r in runs if r["mode"] == mode}, a.wait_key)
    summary = summaries["agent"]
    if a.against:
        old = summaries["against"]
        print(
            f"against -> this: ratio {old['ratio_median']:.3f} -> {summary['ratio_median']:.3f}, "
            f"cpu {old['cpu_us_per_event_median']:.2f} -> {summary['cpu_us_per_event_median']:.2f} us/event, "
            f"rss steady {old['rss_steady_max_mb']:.1f} -> {summary['rss_steady_max_mb']:.1f} MB"
        )
    prof = c.top_functions(a.profile) if a.profile and os.path.exists(a.profile) else None
    if prof:
        print("py-spy on the agent's first run (all threads, 250 Hz): functions by inclusive % of samples")
        c.table(["function", "%"], prof["inclusive"])
        print("source lines by self %")
        c.table(["line", "%"], prof["self_lines"])
    c.emit(
        {
            "bench": "burst",
            "profile_top": prof,
            "machine": m,
            "quick": a.quick,
            "fs": a.fs,
            "writer": a.writer,
            "collector": a.collector,
            "files": a.files,
            "dirs": a.dirs,
            "pairs": a.pairs,
            "summary": summary,
            "against": a.against,
            "summary_against": summaries.get("against"),
            "runs": runs,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
