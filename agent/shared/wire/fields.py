"""Field checks of the collector's decoder: each returns the value or raises
WireError naming the field's path."""

from __future__ import annotations

from typing import Any, Optional

from agent.shared.errors import WireError
from agent.shared.wire.format import MAX_STR, MAX_TS


def _int(v: Any, path: str, lo: int = 0, hi: int = MAX_TS) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise WireError(f"must be an integer, got {type(v).__name__}", path)
    if not lo <= v <= hi:
        raise WireError(f"must be in [{lo}, {hi}], got {v}", path)
    return v


def _str(v: Any, path: str, limit: int = MAX_STR, empty: bool = True) -> str:
    if not isinstance(v, str):
        raise WireError(f"must be a string, got {type(v).__name__}", path)
    if len(v) > limit or (not empty and not v):
        raise WireError(f"length {len(v)} outside [{0 if empty else 1}, {limit}]", path)
    return v


def _bin(v: Any, path: str, nil: bool = True) -> Optional[bytes]:
    if v is None and nil:
        return None
    if not isinstance(v, bytes):
        raise WireError(f"must be bin{' or nil' if nil else ''}, got {type(v).__name__}", path)
    if not v:
        raise WireError("must not be empty", path)
    return v


def _list(v: Any, path: str) -> list[Any]:
    if not isinstance(v, list):
        raise WireError(f"must be an array, got {type(v).__name__}", path)
    return v


def _map(v: Any, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise WireError(f"must be a map, got {type(v).__name__}", path)
    return v
