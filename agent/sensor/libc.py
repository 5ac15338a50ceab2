"""The C library the interpreter already runs on, for ctypes.

Not ``ctypes.util.find_library("c")``: where ``ldconfig -p`` does not name
libc it falls back to running the compiler on a temporary file, and under the
agent's unit (``ProtectSystem=strict`` leaves no writable /tmp) that raises
"No usable temporary directory" — the agent could not start. ``dlopen(NULL)``
finds every libc symbol already loaded, glibc or musl alike."""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
