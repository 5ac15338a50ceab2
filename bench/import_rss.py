#!/usr/bin/env python3
"""What each import costs the agent in RSS: a fresh interpreter per line,
VmRSS after the import (MB), and the difference to the bare interpreter.
Shows where requests' share of the agent's idle RSS goes."""

from __future__ import annotations

import argparse
import subprocess
import sys

import _common as c

STEPS = [
    ("interpreter", ""),
    ("stdlib the agent uses (ssl, http.client, json, sqlite3)", "import ssl, http.client, json, sqlite3"),
    ("+ msgpack, psutil", "import ssl, http.client, json, sqlite3, msgpack, psutil"),
    ("idna", "import idna"),
    ("charset_normalizer", "import charset_normalizer"),
    ("urllib3", "import urllib3"),
    ("requests", "import requests"),
    ("the agent's modules (runtime)", "import agent.sensor.runtime"),
]
PROBE = (
    "{imp}\nwith open('/proc/self/status') as f:\n"
    "    print(next(line.split()[1] for line in f if line.startswith('VmRSS')))"
)


def rss_kb(imp: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(imp=imp)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one round (the default is the median of 5)")
    a = ap.parse_args()
    rounds = 1 if a.quick else 5
    m = c.machine()
    c.print_machine(m)
    got = {name: c.median([rss_kb(imp) / 1024 for _ in range(rounds)]) for name, imp in STEPS}
    base = got["interpreter"] or 0.0
    c.table(
        ["import", "RSS MB", "over the interpreter MB"], [[n, v, (v or 0) - base] for n, v in got.items()]
    )
    c.emit({"bench": "import_rss", "machine": m, "quick": a.quick, "rss_mb": got})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
