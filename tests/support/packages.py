"""Building the .debs from the working tree and installing them with apt, for
the tests that run the installed product."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
PKGS = ["rarewrite-common", "rarewrite-agent", "rarewrite-collector"]


def apt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``apt-get ARGS`` (waiting for dpkg's lock, never asking)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", "-o", "DPkg::Lock::Timeout=300", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=env,
    )


def build_debs(dist: Path) -> list[str]:
    """The three .debs of the working tree, built into ``dist``."""
    build = subprocess.run(
        [str(TOP / "packaging" / "build-deb.sh"), "--worktree"],
        capture_output=True,
        text=True,
        check=False,
        timeout=400,
        env={**os.environ, "RAREWRITE_DIST": str(dist)},
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    return sorted(str(p) for p in dist.glob("*.deb"))


def install(debs: list[str]) -> None:
    inst = apt("install", "-y", "-q", "--no-install-recommends", *debs)
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]


def purge() -> None:
    done = apt("purge", "-y", "-q", *PKGS, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
