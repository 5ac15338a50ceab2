"""A throwaway PostgreSQL server for tests and benchmarks.

:func:`start` finds ``initdb``/``pg_ctl`` (``/usr/lib/postgresql/*/bin``,
then ``PATH``), installs Debian's ``postgresql`` with apt-get when they are
missing and we are root, creates the ``postgres`` user when missing, runs
``initdb`` in a fresh temporary folder as that user and starts the server on
a free port on 127.0.0.1 (no Unix socket outside the folder). TCP logins take
a password (scram-sha-256), so tests exercise ``PGPASSWORD`` and URL
passwords. :meth:`Server.stop` stops it and deletes the folder.

When no server can be had (not root, no apt), :func:`start` raises
:class:`Unavailable` with the reason, and the tests skip with it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.support.procs import free_port

USER = "postgres"
APT_TIMEOUT = 600


class Unavailable(Exception):
    """No PostgreSQL server can be started here; the message says why."""


def _bindir() -> str | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(initdb))
    return None


def _apt_install() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("PostgreSQL is not installed and apt-get cannot install it here (needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        r = subprocess.run(args, check=False, capture_output=True, text=True, timeout=APT_TIMEOUT, env=env)
        if r.returncode != 0:
            raise Unavailable(f"{' '.join(args)} failed: {r.stderr.strip()[-500:]}")


def _ensure_user() -> pwd.struct_passwd | None:
    """The ``postgres`` account when we are root (created if missing); None when not root."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(USER)
    r = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
        check=False,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise Unavailable(f"cannot create the {USER} user: {r.stderr.strip()}")
    return pwd.getpwnam(USER)


@dataclass
class Server:
    port: int
    folder: str
    bindir: str
    password: str
    runas: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"

    def url(self, dbname: str = "postgres", with_password: bool = True) -> str:
        auth = f"{USER}:{self.password}" if with_password else USER
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def env(self) -> dict[str, str]:
        """Environment for a child that connects with a password-less URL."""
        return {**os.environ, "PGPASSWORD": self.password}

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(statement.encode())

    def create_db(self, prefix: str = "t") -> str:
        name = f"{prefix}_{secrets.token_hex(6)}"
        self.sql(f'CREATE DATABASE "{name}"')
        return name

    def drop_db(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        subprocess.run(
            [os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop"],
            check=False,
            capture_output=True,
            timeout=60,
            **self.runas,
        )
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def data(self) -> str:
        return os.path.join(self.folder, "data")

    def log_text(self) -> str:
        try:
            with open(os.path.join(self.folder, "server.log"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def start(durable: bool = False, settings: dict[str, str] | None = None) -> Server:
    """A fresh cluster on a free port. ``durable=False`` turns fsync off (tests);
    benchmarks pass True to measure with the server's real commit cost."""
    bindir = _bindir()
    if bindir is None:
        _apt_install()
        bindir = _bindir()
        if bindir is None:
            raise Unavailable("apt-get installed postgresql but no initdb was found")
    account = _ensure_user()
    runas: dict[str, Any] = {}
    folder = tempfile.mkdtemp(prefix="rarewrite-pg-")
    if account is not None:
        runas = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        os.chown(folder, account.pw_uid, account.pw_gid)
    password = secrets.token_urlsafe(18)
    pwfile = os.path.join(folder, "pw")
    with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(password + "\n")
    if account is not None:
        os.chown(pwfile, account.pw_uid, account.pw_gid)
    data = os.path.join(folder, "data")
    r = subprocess.run(
        [
            os.path.join(bindir, "initdb"),
            "-D",
            data,
            "-U",
            USER,
            "--pwfile",
            pwfile,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            *([] if durable else ["--no-sync"]),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
        **runas,
    )
    os.unlink(pwfile)
    if r.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise Unavailable(f"initdb failed: {r.stderr.strip()[-800:]}")
    conf = {
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": f"'{folder}'",
        "max_connections": "200",
        "shared_buffers": "256MB",
        "logging_collector": "off",
    }
    if not durable:
        conf.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
    conf.update(settings or {})
    with open(os.path.join(data, "postgresql.conf"), "a", encoding="utf-8") as f:
        f.writelines(f"{k} = {v}\n" for k, v in conf.items())
    last = ""
    for _ in range(3):  # a free port can be taken between the probe and the bind
        port = free_port()
        r = subprocess.run(
            [
                os.path.join(bindir, "pg_ctl"),
                "-D",
                data,
                "-o",
                f"-p {port}",
                "-l",
                os.path.join(folder, "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=90,
            cwd=folder,
            **runas,
        )
        server = Server(port, folder, bindir, password, runas)
        if r.returncode == 0:
            _wait_ready(server)
            return server
        last = r.stderr.strip() + server.log_text()[-800:]
    shutil.rmtree(folder, ignore_errors=True)
    raise Unavailable(f"pg_ctl start failed: {last[-800:]}")


def _wait_ready(server: Server) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(server.url(), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def running(durable: bool = False, settings: dict[str, str] | None = None) -> Iterator[Server]:
    server = start(durable, settings)
    try:
        yield server
    finally:
        server.stop()


def backend_store(backend: str, tmp_path: Any, request: Any) -> Any:
    """A collector store of ``backend`` ("sqlite": a file in ``tmp_path``;
    "postgres": the session's test server, through the ``pg_url`` fixture)."""
    from agent.collector.storage import open_store
    from agent.collector.storage.sqlite import CollectorStore

    if backend == "sqlite":
        return CollectorStore(str(tmp_path / "c.db"))
    return open_store(request.getfixturevalue("pg_url"))
