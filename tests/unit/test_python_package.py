"""The Python distribution a user pip-installs: ``python -m build`` makes an
sdist and a wheel that ``twine check --strict`` passes, and the wheel
installs into a clean venv where ``pip check`` finds nothing and the
command runs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import agent

TOP = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout)


@pytest.mark.slow
def test_build_twine_check_and_a_clean_install(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = _run([sys.executable, "-m", "build", "--outdir", str(dist), str(TOP)])
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    v = agent.__version__
    wheel, sdist = dist / f"rarewrite-{v}-py3-none-any.whl", dist / f"rarewrite-{v}.tar.gz"
    assert wheel.exists() and sdist.exists(), sorted(p.name for p in dist.iterdir())
    twine = _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])
    assert twine.returncode == 0 and twine.stdout.count("PASSED") == 2, twine.stdout + twine.stderr
    names = zipfile.ZipFile(wheel).namelist()
    assert "agent/py.typed" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert "agent/shared/wire/format.py" in names and not any(n.startswith("tests/") for n in names)
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    pip = str(venv / "bin" / "pip")
    inst = _run([pip, "install", "-q", "--disable-pip-version-check", str(wheel)])
    assert inst.returncode == 0, inst.stderr[-2000:]
    check = _run([pip, "check", "--disable-pip-version-check"])
    assert check.returncode == 0, check.stdout + check.stderr
    version = _run([str(venv / "bin" / "rarewrite"), "--version"], timeout=60)
    assert version.stdout.strip() == f"rarewrite {v}", version
