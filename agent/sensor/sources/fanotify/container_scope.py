"""The watch scope in containers' terms, in host paths: ``--watch
/var/www/html`` covers each container's ``/var/www/html``, which the kernel
reports under its overlay's upper directory, its bind mount's source or
(for a mount only the container has) below its root. And the marks such
container-only mounts need, placed through ``/proc/PID/root``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from agent.sensor.containers import Containers, View
from agent.sensor.sources.base import under


@dataclass(frozen=True)
class OwnMount:
    """A filesystem only a container has: where to mark it, and whether its
    files are in scope (else execs only)."""

    key: tuple[int, int]  # (namespace, mount id)
    point: bytes  # /proc/PID/root/MOUNT: reaches it from the agent's namespace
    root: bytes  # /proc/PID/root
    mount_point: bytes  # in the container
    label: str  # how gaps and logs name it
    in_scope: bool


class ContainerScope:
    def __init__(self, containers: Containers, watch: list[bytes], exclude: list[bytes]) -> None:
        self.containers = containers
        self._watch = watch
        self._exclude = exclude
        self._generation = -1
        self.prefixes: tuple[bytes, ...] = ()  # host prefixes (ending in "/") in scope
        self.equal: frozenset[bytes] = frozenset()
        self.excluded: tuple[bytes, ...] = ()
        self.own: list[OwnMount] = []

    def refresh(self) -> bool:
        """Recompute after the containers changed; True when they had."""
        if self.containers.generation == self._generation:
            return False
        self._generation = self.containers.generation
        pre: set[bytes] = set()
        excl: set[bytes] = set()
        own: list[OwnMount] = []
        for v in self.containers.views():
            for host, inside in v.routes:
                pre.update(_rebased(self._watch, inside, host))
                excl.update(_rebased(self._exclude, inside, host))
            own.extend(self._own(v))
        self.prefixes = tuple(sorted(p.rstrip(b"/") + b"/" for p in pre))
        self.equal = frozenset(pre)
        self.excluded = tuple(sorted(x.rstrip(b"/") + b"/" for x in excl))
        self.own = own
        return True

    def _own(self, v: View) -> list[OwnMount]:
        out = []
        for m in v.own_mounts:
            in_scope = any(under(m.mount_point, w) or under(w, m.mount_point) for w in self._watch)
            who = v.info.id[:12] if v.info is not None else f"ns:{v.ns}"
            root = b"/proc/%d/root" % v.pid
            point = root + (m.mount_point if m.mount_point != b"/" else b"")
            label = f"{who}:{m.mount_point.decode(errors='replace')}"
            out.append(OwnMount((v.ns, m.mount_id), point, root, m.mount_point, label, in_scope))
        return out

    def in_scope(self, path: bytes) -> Optional[bool]:
        """True/False for a path under a container's route, None otherwise."""
        if path.startswith(self.prefixes) or path in self.equal:
            return not path.startswith(self.excluded)
        return None


def _rebased(paths: list[bytes], inside: bytes, host: bytes) -> list[bytes]:
    """The host paths of the container ``paths`` that a route (container
    ``inside`` shown from host ``host``) covers."""
    out: list[bytes] = []
    if host == b"/":  # the host's whole tree shown inside (-v /:/host): nothing container-only
        return out
    for w in paths:
        if under(w, inside):  # a watch within the mount: the same place below its host side
            rest = w[len(inside.rstrip(b"/")) :]
            out.append(host.rstrip(b"/") + rest if rest else host)
        elif under(inside, w):  # the whole mount is within the watch
            out.append(host)
    return out
