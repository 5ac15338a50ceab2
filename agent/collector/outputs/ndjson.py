"""Alerts as NDJSON lines in a file, rotated by size."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from agent.shared.text import dumps

log = logging.getLogger("rarewrite.collector.outputs")

DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_KEEP = 5


class NdjsonOutput:
    """Appends one JSON document a line; fsync once per batch (and before a
    rotation). Before a line would take the file past ``max_bytes`` the file
    is rotated: ``path.(keep-1)`` -> ``path.keep`` ... ``path`` -> ``path.1``
    (atomic renames, the directory fsynced), the oldest is overwritten. A
    single line longer than ``max_bytes`` gets a file of its own."""

    def __init__(
        self, path: str, name: str = "ndjson", max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
    ) -> None:
        if max_bytes < 1 or keep < 1:
            raise ValueError("max_bytes and keep must be at least 1")
        self.name = name
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.rotations = 0
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._size += n

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        for i in range(self.keep - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._open()
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        self.rotations += 1
        log.info("event=alerts_file_rotated output=%r path=%r keep=%d", self.name, self.path, self.keep)

    def emit(self, alerts: Sequence[dict[str, Any]]) -> None:
        if not alerts:
            return
        if self._fd < 0:
            self._open()  # a rotation that failed half-way left it closed
        pending: list[bytes] = []
        pending_len = 0
        for a in alerts:
            line = (dumps(a) + "\n").encode("ascii")
            if self._size + pending_len + len(line) > self.max_bytes and self._size + pending_len > 0:
                if pending:
                    self._write(b"".join(pending))
                    pending, pending_len = [], 0
                self._rotate()
            pending.append(line)
            pending_len += len(line)
        if pending:
            self._write(b"".join(pending))
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
