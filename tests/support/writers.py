"""Web-server-named writers for tests with real processes.

``make_writers(base)`` lays out ``base/bin`` with a copy of dash named
``nginx`` (a long-lived writer: the shell writes, then lingers) and a copy of
touch named ``uwsgi`` (a writer that exits at once), and ``base/www``, owned
by www-data (uid 33). ``Writers.write_as_www(snippet)`` runs a shell snippet
as www-data under the name ``nginx``, the way a web shell's commands run.

The base folder must be reachable by uid 33 (no 0700 parent on the way):
pytest's ``tmp_path`` is not, so use :func:`www_tempdir` (under /srv).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

WWW_UID = 33
WWW_GID = 33
AS_WWW = ["setpriv", f"--reuid={WWW_UID}", f"--regid={WWW_GID}", "--clear-groups"]


def can_run() -> str:
    """Empty when writers can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (setpriv to uid 33, chown)"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    if not os.path.exists("/bin/dash") or shutil.which("touch") is None:
        return "needs /bin/dash and touch"
    return ""


@dataclass(frozen=True)
class Writers:
    base: str
    bin_dir: str
    www: str  # owned by www-data: where the writers write
    nginx: str  # dash copy
    uwsgi: str  # touch copy

    def write_as_www(self, snippet: str, linger: float = 0.3, timeout: float = 30) -> None:
        """Run ``snippet`` with ``nginx -c`` as www-data in ``www``; the
        shell stays alive ``linger`` seconds after it so it can be resolved."""
        if linger > 0:
            snippet = f"{snippet}\nsleep {linger:g}"
        subprocess.run(
            [*AS_WWW, self.nginx, "-c", snippet],
            cwd=self.www,
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def create_as_www(self, names: list[str], linger: float = 0.3) -> list[str]:
        """Create empty files ``www/<name>`` as www-data (nginx); their paths."""
        paths = [os.path.join(self.www, n) for n in names]
        self.write_as_www(
            "for f in " + " ".join(shlex.quote(p) for p in paths) + '; do : > "$f"; done', linger
        )
        return paths

    def touch_as_www(self, path: str) -> None:
        """Create ``path`` with ``uwsgi`` (touch), a writer that exits at once."""
        subprocess.run([*AS_WWW, self.uwsgi, path], check=True, capture_output=True, timeout=30)


def make_writers(base_dir: str) -> Writers:
    os.makedirs(base_dir, exist_ok=True)
    bin_dir, www = os.path.join(base_dir, "bin"), os.path.join(base_dir, "www")
    os.makedirs(bin_dir, exist_ok=True)
    os.makedirs(www, exist_ok=True)
    os.chmod(base_dir, 0o755)  # noqa: S103 - uid 33 must reach the writers
    os.chmod(bin_dir, 0o755)  # noqa: S103 - same
    os.chown(www, WWW_UID, WWW_GID)
    nginx, uwsgi = os.path.join(bin_dir, "nginx"), os.path.join(bin_dir, "uwsgi")
    shutil.copy("/bin/dash", nginx)
    shutil.copy(shutil.which("touch") or "/usr/bin/touch", uwsgi)
    for exe in (nginx, uwsgi):
        os.chmod(exe, 0o755)  # noqa: S103 - uid 33 runs them
    return Writers(base_dir, bin_dir, www, nginx, uwsgi)


@contextlib.contextmanager
def www_tempdir(prefix: str = "rw-test-", parent: str = "/srv") -> Iterator[str]:
    """A folder uid 33 can reach (under /srv), removed afterwards."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o755)  # noqa: S103 - uid 33 must reach it
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
