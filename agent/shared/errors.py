"""The one exception tree of rarewrite.

::

    RarewriteError
     +-- ConfigError          bad config; carries every problem found
     +-- WireError            a batch that does not follow the wire format
     |    +-- VersionError    a wire version this side does not speak
     +-- StoreError           a state or collector database problem
     +-- ShipError            talking to the collector failed
     |    +-- EnrollError     the collector refused enrollment (fatal)
     +-- SourceError          an event source cannot start here

Callers catch the level they care about; the CLI turns each into a clear
message and a non-zero exit.
"""

from __future__ import annotations

from collections.abc import Sequence


class RarewriteError(Exception):
    """Base of every error rarewrite raises on purpose."""


class ConfigError(RarewriteError):
    """Configuration problems, all of them at once."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class WireError(RarewriteError):
    """A batch or record that breaks the wire format; ``path`` names the field."""

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class VersionError(WireError):
    """A wire version this side does not speak."""


class StoreError(RarewriteError):
    """A database problem that the caller may retry or report."""


class ShipError(RarewriteError):
    """Delivery to the collector failed; the batch stays in the outbox."""


class EnrollError(ShipError):
    """The collector refused enrollment: wrong secret or revoked agent."""


class SourceError(RarewriteError):
    """An event source is not available on this machine or cannot start."""
