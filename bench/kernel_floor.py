#!/usr/bin/env python3
"""What a fanotify group costs the writer before any agent work (issue 7).

Root only. burst.py's workload (one process as www-data: D new directories,
F files, every 10th written as ``.tmp`` and renamed to ``.php``) on a
scratch filesystem, with no sensor and with a bare fanotify group marked on
that filesystem (the agent's flags: ``FAN_REPORT_DFID_NAME`` + ``FID`` +
``TARGET_FID``, unlimited queue, ``FAN_CREATE | FAN_ONDIR | FAN_RENAME``)
read in different ways by a thread of this script:

  noread         nobody reads: the queue grows to the whole burst
  read-eager     a thread reads as soon as an event is there (poll, read)
  read-batched   after a short read it sleeps 5 ms, so events gather
                 (what the agent's read-ahead thread does)
  read+parse     read-batched, and every buffer parsed in a second thread
                 (``fanotify_abi.parse_buffer``): the CPU the agent would
                 spend on the other core during the burst

Rotated rounds (the order shifts every round); ratio = mode wall / none
wall of the same round, median over rounds. The writer's own wall time.
It explains the agent's design: read at once, in batches, and leave the
work for after the burst (``agent/sources/fanotify.py``).
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any, Optional

import _common as c

from agent.sensor.sources.fanotify import abi as fa

MODES = ("none", "noread", "read-eager", "read-batched", "read+parse")


class Group:
    """A fanotify group marked on ``mount`` and the thread(s) reading it."""

    def __init__(self, mount: str, mode: str) -> None:
        self.fd = fa.fanotify_init(
            fa.FAN_CLASS_NOTIF
            | fa.FAN_CLOEXEC
            | fa.FAN_NONBLOCK
            | fa.FAN_UNLIMITED_QUEUE
            | fa.FAN_REPORT_DFID_NAME_TARGET,
            os.O_RDONLY | fa.O_LARGEFILE,
        )
        fa.fanotify_mark(
            self.fd,
            fa.FAN_MARK_ADD | fa.FAN_MARK_FILESYSTEM,
            fa.FAN_CREATE | fa.FAN_ONDIR | fa.FAN_RENAME,
            fa.AT_FDCWD,
            mount.encode(),
        )
        self.mode = mode
        self.stop = threading.Event()
        self.reads = 0
        self.bytes = 0
        self.parsed = 0
        self.bufs: deque[bytes] = deque()
        self.threads: list[threading.Thread] = []
        if mode != "noread":
            self.threads.append(threading.Thread(target=self._read, daemon=True))
        if mode == "read+parse":
            self.threads.append(threading.Thread(target=self._parse, daemon=True))
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        batched = self.mode != "read-eager"
        while not self.stop.is_set():
            try:
                buf = os.read(self.fd, 256 * 1024)
            except BlockingIOError:
                if poller.poll(100) and batched:
                    time.sleep(0.005)
                continue
            self.reads += 1
            self.bytes += len(buf)
            if self.mode == "read+parse":
                self.bufs.append(buf)
            if batched and len(buf) < 128 * 1024:
                time.sleep(0.005)

    def _parse(self) -> None:
        while not self.stop.is_set() or self.bufs:
            try:
                buf = self.bufs.popleft()
            except IndexError:
                time.sleep(0.001)
                continue
            self.parsed += len(fa.parse_buffer(buf).events)

    def close(self) -> dict[str, Any]:
        time.sleep(0.2)  # let the readers take the tail
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        os.close(self.fd)
        return {"reads": self.reads, "read_kib": self.bytes // 1024, "parsed": self.parsed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fs", choices=("tmpfs", "ext4"), default="tmpfs", help="scratch filesystem")
    ap.add_argument("--files", type=int, default=100_000, help="files per run (default 100,000)")
    ap.add_argument("--dirs", type=int, default=100, help="new directories per run (default 100)")
    ap.add_argument("--rounds", type=int, default=4, help="rotated rounds (default 4)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test): 2,000 files, 1 round")
    a = ap.parse_args()
    if a.quick:
        a.files, a.dirs, a.rounds = 2000, 10, 1
    m = c.machine()
    c.print_machine(m)
    if os.geteuid() != 0:
        print("needs root (mount, fanotify, setpriv)")
        return 2
    tmp = tempfile.mkdtemp(prefix="rw-floor-")
    writer = c.burst_writer(tmp)
    runs: list[dict[str, Any]] = []
    target: Optional[c.Target] = None
    try:
        target = c.Target(a.fs, max(256, a.files // 100 * 4), "floor")
        for k in range(a.rounds):
            order = MODES[k % len(MODES) :] + MODES[: k % len(MODES)]
            for mode in order:
                root = os.path.join(target.mnt, f"r{k}-{mode}")
                group = Group(target.mnt, mode) if mode != "none" else None
                try:
                    w = c.workload(writer, root, a.files, a.dirs)
                finally:
                    extra = group.close() if group is not None else {}
                shutil.rmtree(root)
                runs.append({"round": k, "mode": mode, **w, **extra})
                print(f"  round {k} {mode:12s} wall {w['wall_s']:.3f} s", file=sys.stderr)
    finally:
        if target is not None:
            target.close()
        shutil.rmtree(tmp, ignore_errors=True)
    base = {r["round"]: r["wall_s"] for r in runs if r["mode"] == "none"}
    summary: dict[str, Any] = {}
    rows = []
    for mode in MODES[1:]:
        mine = [r for r in runs if r["mode"] == mode]
        ratios = [r["wall_s"] / base[r["round"]] for r in mine]
        reads = c.median([r["reads"] for r in mine]) or 0
        kib = c.median([r["read_kib"] / max(r["reads"], 1) for r in mine]) or 0.0
        summary[mode] = {"ratio_median": c.median(ratios), "ratios": ratios, "reads_median": reads}
        rows.append([mode, c.median(ratios), min(ratios), max(ratios), reads, kib])
    events = a.files + a.files // 10 + a.dirs
    print(
        f"fanotify group alone on {a.fs}: {events} events per run, writer php-fpm8.2 (python) as www-data, "
        f"{a.rounds} rotated rounds; none median {c.median(list(base.values())):.3f} s"
    )
    c.table(["mode", "ratio", "min", "max", "reads", "KiB/read"], rows)
    c.emit(
        {
            "bench": "kernel_floor",
            "machine": m,
            "quick": a.quick,
            "fs": a.fs,
            "files": a.files,
            "dirs": a.dirs,
            "rounds": a.rounds,
            "summary": summary,
            "runs": runs,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
