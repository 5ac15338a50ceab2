#!/usr/bin/env python3
"""How often a writer that writes one file and exits at once is attributed (issue 4).

Root only. A collector and ``rarewrite agent run --watch DIR`` run for real;
N short-lived writers run one after another as www-data (``setpriv``), each
creating one distinct file and exiting at once:
  touch-uwsgi: a copy of /usr/bin/touch named uwsgi   (uwsgi FILE)
  dash-nginx:  a copy of /bin/dash named nginx         (nginx -c ': > FILE')
After the agent has flushed (SIGTERM), ``collector evaluate`` gives the rows;
a file counts as attributed when its row has the writer's process.executable.
rate = attributed / N per variant. The agent's status counters are reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

import _common as c

from tests.support import procs


def settle(state: str, quiet_s: float = 1.5, timeout: float = 30) -> dict[str, Any]:
    """The status once counters.seen has not moved for quiet_s."""
    t0 = last_change = time.monotonic()
    last = None
    st: dict[str, Any] = {}
    while time.monotonic() - t0 < timeout:
        st = c.status(state)
        seen = st.get("counters", {}).get("seen")
        if seen != last:
            last, last_change = seen, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            break
        time.sleep(0.1)
    return st


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200, help="writers per variant (default 200)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    a = ap.parse_args()
    if a.quick:
        a.n = 10
    m = c.machine()
    c.print_machine(m)
    if os.geteuid() != 0:
        print("needs root (fanotify, setpriv)")
        return 2
    os.makedirs("/srv", exist_ok=True)
    base = tempfile.mkdtemp(prefix="rw-bench-short-", dir="/srv")
    tmp = tempfile.mkdtemp(prefix="rw-short-")
    binp, www = os.path.join(base, "bin"), os.path.join(base, "www")
    os.makedirs(binp)
    os.makedirs(www)
    for d in (base, binp):
        os.chmod(d, 0o755)  # noqa: S103 - www-data must traverse to its folder
    uwsgi, nginx = os.path.join(binp, "uwsgi"), os.path.join(binp, "nginx")
    shutil.copy("/usr/bin/touch", uwsgi)
    shutil.copy("/bin/dash", nginx)
    variants: dict[str, tuple[str, Any]] = {
        "touch-uwsgi": (uwsgi, lambda f: [uwsgi, f]),
        "dash-nginx": (nginx, lambda f: [nginx, "-c", f": > '{f}'"]),
    }
    for v in variants:
        os.makedirs(os.path.join(www, v))
        shutil.chown(os.path.join(www, v), 33, 33)
    shutil.chown(www, 33, 33)
    results: dict[str, dict[str, Any]] = {}
    agent = None
    try:
        with procs.collector(tmp) as col:
            state = os.path.join(tmp, "agent")
            agent = c.start_agent(tmp, col.url, state, www)
            time.sleep(0.5)
            files: dict[str, list[str]] = {}
            for v, (_exe, argv) in variants.items():
                files[v] = []
                t0 = time.monotonic()
                for i in range(a.n):
                    f = os.path.join(www, v, f"f{i:05d}.php")
                    subprocess.run([*c.AS_WWW, *argv(f)], check=True)
                    files[v].append(f)
                spawn_s = time.monotonic() - t0
                st = settle(state)
                results[v] = {"n": a.n, "spawn_s": spawn_s, "counters_after": st.get("counters", {})}
            procs.stop(agent)
            final = c.status(state)
            rows = c.evaluate(col.db, int(time.time() * 1000) + 1000, tmp)
    finally:
        procs.stop(agent)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    by_path = {r["file.path"]: r for r in rows}
    for v, (exe, _argv) in variants.items():
        got = [by_path.get(f) for f in files[v]]
        ok = sum(1 for r in got if r is not None and r["process.executable"] == exe)
        wrong = sum(1 for r in got if r is not None and r["process.executable"] != exe)
        results[v].update(
            attributed=ok,
            wrong_executable=wrong,
            missing=sum(1 for r in got if r is None),
            missing_paths=[f for f, r in zip(files[v], got) if r is None][:10],
            rate=ok / a.n,
        )
    print(f"{a.n} writers per variant, each writes one file as www-data and exits at once")
    c.table(
        ["variant", "N", "attributed", "wrong exe", "no row", "rate", "spawn s"],
        [
            [v, r["n"], r["attributed"], r["wrong_executable"], r["missing"], r["rate"], r["spawn_s"]]
            for v, r in results.items()
        ],
    )
    counters = final.get("counters", {})
    keys = ("seen", "matched", "unknown", "overflows", "dropped", "stored", "detailed")
    print("agent counters at exit: " + " ".join(f"{k}={counters.get(k)}" for k in keys))
    print("agent source stats: " + str(final.get("source", {}))[:300])
    for v, r in results.items():
        if r["missing_paths"]:
            print(f"{v}: no row for " + ", ".join(os.path.basename(p) for p in r["missing_paths"]))
    c.emit(
        {
            "bench": "short_lived",
            "machine": m,
            "quick": a.quick,
            "variants": results,
            "agent_counters": counters,
            "agent_source": final.get("source", {}),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
