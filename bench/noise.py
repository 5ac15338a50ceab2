#!/usr/bin/env python3
"""Benign alerts on a real PHP site, the rule exactly as published against
the recommended exceptions and suppression (issue 14): Debian's nginx and
php-fpm, sessions, uploads, large posts and a page cache for N visitors,
then a web shell uploaded through the form, a second stage in /dev/shm and
an .htaccess. Root (fanotify, the web servers); installs nginx-light and
php8.2-fpm with apt-get when missing. The same scenario is the e2e test
tests/e2e/test_noise_php_site.py."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common as c

from tests.support import php_site


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--visitors", type=int, default=1000)
    ap.add_argument("--uploads", type=int, default=100)
    ap.add_argument("--large-posts", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="50 visitors, 5 uploads, 3 large posts")
    a = ap.parse_args()
    why = php_site.installed()
    if why:
        raise SystemExit(why)
    traffic = (
        php_site.Traffic(50, 5, 3) if a.quick else php_site.Traffic(a.visitors, a.uploads, a.large_posts)
    )
    m = c.machine()
    c.print_machine(m)
    with tempfile.TemporaryDirectory(prefix="rw-noise-") as tmp:
        got = php_site.measure(Path(tmp), traffic)
    ex, tu = got["exact"], got["tuned"]
    n = len(got["attack_files"])
    c.table(
        ["rule", "benign rows", "benign alerts", "attack files alerted", "attack alert latency s"],
        [
            ["exact (exceptions = none)", ex["benign_rows"], ex["benign_alerts"],
             f"{len(ex['attack_found'])}/{n}", "-"],
            ["recommended + suppression", "-", tu["benign_alerts"], f"{len(tu['attack_found'])}/{n}",
             max(tu["latency_s"].values(), default="-")],
        ],
    )  # fmt: skip
    print("benign rows by kind (exact):", ex["benign_by_kind"])
    c.emit({"bench": "noise", "machine": m, "quick": a.quick, **got})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
