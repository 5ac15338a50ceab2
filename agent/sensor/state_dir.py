"""The agent's state folder: the lock that makes one agent per folder, its
identity, the status file, and ``rarewrite agent status``."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import uuid
from typing import Any, Optional

from agent.sensor.shipper import Identity
from agent.shared.errors import RarewriteError

log = logging.getLogger("rarewrite.agent")

STATUS_FILE = "status.json"
LOCK_FILE = "agent.lock"


class StateDir:
    """The agent's folder: lock, identity, store, key, status."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self._lock_fd: Optional[int] = None
        self._status_failing = False

    def lock(self) -> None:
        """One agent per state dir; the lock dies with the process (SIGKILL too)."""
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RarewriteError(f"{self.path} is in use by another running agent") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def identity(self, agent_id: str = "", host_name: str = "") -> Identity:
        """The agent id made on first start (or the one forced); the host name."""
        ident_path = os.path.join(self.path, "identity.json")
        stored: dict[str, Any] = {}
        try:
            with open(ident_path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError):
            pass
        if not agent_id:
            agent_id = str(stored.get("agent_id") or uuid.uuid4())
        if stored.get("agent_id") != agent_id:
            _write_atomic(ident_path, json.dumps({"agent_id": agent_id}).encode(), 0o600)
        return Identity(agent_id, host_name or socket.gethostname())

    def write_status(self, doc: dict[str, Any]) -> None:
        path = os.path.join(self.path, STATUS_FILE)
        try:
            _write_atomic(path, json.dumps(doc, indent=1).encode(), 0o644)
        except OSError as e:
            # A full disk must not stop the sensor: the status stays stale until space returns.
            with contextlib.suppress(OSError):
                os.unlink(f"{path}.{os.getpid()}.tmp")
            if not self._status_failing:
                log.error("event=status_not_written path=%r error=%r", path, str(e))
            self._status_failing = True
            return
        self._status_failing = False

    @property
    def store_path(self) -> str:
        return os.path.join(self.path, "agent.db")


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_status(state_dir: str) -> tuple[int, dict[str, Any]]:
    """(exit code, document) for ``rarewrite agent status``: 0 and state
    "running" only while an agent holds the state dir's lock."""
    path = os.path.abspath(state_dir)
    doc: dict[str, Any] = {}
    try:
        with open(os.path.join(path, STATUS_FILE), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        pass
    alive = False
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            alive = True
        finally:
            os.close(fd)
    except OSError:
        pass
    if not alive:
        last = doc.get("state")
        doc["state"] = "stopped"
        if last and last != "stopped":
            doc["last_state"] = last
        return 3, doc  # LSB: program is not running
    if doc.get("state") != "running":
        return 3, doc  # alive but not (yet) watching
    return 0, doc


MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def machine_id(files: tuple[str, ...] = MACHINE_ID_FILES) -> str:
    """This host's machine id (systemd's, 32 hex digits): ECS ``host.id``, as
    Elastic Defend reports it; "" where there is none (the collector then
    uses the agent id)."""
    for name in files:
        try:
            with open(name, encoding="ascii") as f:
                got = f.read(64).strip()
        except (OSError, UnicodeDecodeError):
            continue
        if len(got) == 32 and all(c in "0123456789abcdef" for c in got):
            return got
    return ""
