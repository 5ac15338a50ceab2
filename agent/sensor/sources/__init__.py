"""Event sources: the kernel side. No rule logic lives here (osquery's split)."""

from __future__ import annotations
