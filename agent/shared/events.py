"""The one event shape everything passes on.

A source yields :class:`RawEvent` (what the kernel said); the resolver turns
it into a :class:`FileEvent` (who did it); the rule, the store and the wire
only ever see :class:`FileEvent`. Paths and executables are ``bytes``: Linux
file names are bytes, and a hostile name must survive unchanged. The two
per-event shapes are named tuples: a busy host makes hundreds of thousands a
second, and a frozen dataclass costs three times as much to build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

# RawEvent.kind values
CREATION = "creation"
RENAME = "rename"
EXEC = "exec"  # a process started: pid and executable, for short-lived writers
OVERFLOW = "overflow"  # the kernel queue overflowed: events were lost

# FileEvent.attribution values
EXACT = "exact"  # read from /proc for the writing pid while it ran
CACHED = "cached"  # remembered from the process's exec or an earlier event
INFERRED = "inferred"  # no pid (inotify): guessed from file owner and running servers
UNKNOWN = "unknown"  # no process found; the event is kept all the same
RECORDED = "recorded"  # taken from a recorded document (replay)
# the process changed its name or user at a moment the kernel did not report
# (prctl, setuid), or exec'd where no mark sees it: the identity it had before is given
UNCERTAIN = "uncertain"
ATTRIBUTIONS = (EXACT, CACHED, INFERRED, UNKNOWN, RECORDED, UNCERTAIN)


class RawEvent(NamedTuple):
    """One kernel notification, before attribution.

    ``pid`` is the writer's process id (thread group id) where the source
    knows it (fanotify), ``None`` where it does not (inotify). For ``exec``
    events ``path`` is the executable that was opened for execution.
    ``lost`` counts dropped events on an ``overflow`` record.
    """

    kind: str
    ts_ms: int
    path: Optional[bytes]
    pid: Optional[int] = None
    original_path: Optional[bytes] = None
    is_dir: bool = False
    lost: int = 0
    own_fs: bool = False  # on a filesystem only a container has (marked through /proc/PID/root)


@dataclass(frozen=True)
class ContainerInfo:
    """The container a writer runs in (ECS container.*), from its cgroup."""

    id: str
    runtime: Optional[str] = None  # docker, containerd, cri-o, podman, kubernetes
    name: Optional[str] = None
    image: Optional[str] = None


@dataclass(frozen=True)
class ProcessInfo:
    pid: Optional[int] = None
    name: Optional[str] = None  # the kernel's task name (psutil's name())
    executable: Optional[bytes] = None
    ppid: Optional[int] = None
    command_line: Optional[str] = None
    start_time: Optional[float] = None  # seconds since the epoch
    parent_name: Optional[str] = None
    parent_executable: Optional[bytes] = None
    container: Optional[ContainerInfo] = None
    vpid: Optional[int] = None  # the pid inside its container's pid namespace


@dataclass(frozen=True)
class UserInfo:
    id: Optional[str] = None  # effective uid, as a string (ECS keyword)
    name: Optional[str] = None


# Who wrote an event, as exceptions see it: (process.name, user.name, user.id)
Actor = tuple[Optional[str], Optional[str], Optional[str]]


@dataclass(frozen=True)
class FileFacts:
    """What the agent read of the file when it recorded the event."""

    size: Optional[int] = None
    mode: Optional[int] = None
    uid: Optional[int] = None
    gid: Optional[int] = None
    sha256: Optional[str] = None
    sample: Optional[bytes] = None
    gone: bool = False


class FileEvent(NamedTuple):
    """A file creation or rename with the process and user behind it.

    ``event_type`` is ECS ``event.type`` (creation -> ("creation",), rename ->
    ("change",)); ``os_type`` is ECS ``host.os.type``; ``original_path`` is
    the rename's source (ECS ``file.Ext.original.path``).
    """

    ts_ms: int
    action: str
    path: Optional[bytes]
    process: ProcessInfo = ProcessInfo()
    user: UserInfo = UserInfo()
    event_type: tuple[str, ...] = ("creation",)
    original_path: Optional[bytes] = None
    os_type: Optional[str] = "linux"
    attribution: str = EXACT
    file: Optional[FileFacts] = None
    host_path: Optional[bytes] = None  # where the host sees ``path``, when a container's path differs


def event_type_for(action: str) -> tuple[str, ...]:
    """ECS event.type as Elastic Defend writes it for Linux file events."""
    return ("creation",) if action == CREATION else ("change",)
