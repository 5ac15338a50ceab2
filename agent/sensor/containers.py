"""Containers as their processes see them: for a mount namespace other than
the agent's, how its host paths read inside it, who its users are, and
which container it is.

The kernel reports a container's write where it lands on the host: in the
overlay's upper directory (``.../diff/var/www/html/shell.php``), a bind
mount's source, or (for a mount only the container has, marked through
``/proc/PID/root``) under the container's root. A rule that counts
(executable, path) over a fleet must see ``/var/www/html/shell.php`` for
every replica, so the agent translates with what ``/proc/PID/mountinfo``
says (``upperdir=``, ``lowerdir=``, ``workdir=``, each bind mount's root)
and ``/proc/PID/root``; users come from the container's uid map and its own
``/etc/passwd``; the container's id from its cgroup path, which every
runtime names after it (docker, containerd and CRI-O under kubepods,
podman's libpod). No runtime socket: nothing here can hang on a daemon.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Callable, Optional

from agent.sensor import longpath
from agent.sensor.sources.fanotify.mounts import PSEUDO_FS, Mount, mount_options, parse_mountinfo
from agent.shared.events import ContainerInfo

log = logging.getLogger("rarewrite.agent")

MAX_VIEWS = 4096  # namespaces remembered (a host runs far fewer containers)
PASSWD_MAX = 1 << 20  # a container's /etc/passwd is read up to this
NOT_CONTAINER_FS = PSEUDO_FS | {"overlay", "devtmpfs", "mqueue"}
_ID = re.compile(r"(?:(docker|cri-containerd|crio|libpod|containerd)[-/:])?([0-9a-f]{64})(?:\.scope)?$")
_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "containerd": "containerd",
             "crio": "cri-o", "libpod": "podman"}  # fmt: skip


def container_of(cgroup: bytes) -> Optional[ContainerInfo]:
    """The container a process's /proc/PID/cgroup names, if any."""
    kube = False
    for line in cgroup.decode("utf-8", "replace").split("\n"):
        path = line.split(":", 2)[-1]
        kube = kube or "kubepods" in path
        parts = path.split("/")
        for i in range(len(parts) - 1, -1, -1):
            m = _ID.search(parts[i])
            if m is not None:  # docker-ID.scope (systemd), or ID under a runtime's folder (cgroupfs)
                named = m.group(1) or (parts[i - 1] if i > 0 else "")
                runtime = _RUNTIMES.get(named, "kubernetes" if kube else None)
                return ContainerInfo(id=m.group(2), runtime=runtime)
    return None


@dataclass
class View:
    """One mount namespace, as read from one of its processes."""

    ns: int
    pid: int
    root: bytes  # /proc/PID/root as the host reads it ("/" after pivot_root)
    info: Optional[ContainerInfo]
    # (host prefix, container prefix), longest host prefix first
    routes: list[tuple[bytes, bytes]] = field(default_factory=list)
    work: tuple[bytes, ...] = ()  # overlay work directories: the kernel's own copy-up entries
    own_mounts: list[Mount] = field(default_factory=list)  # filesystems only this namespace has
    uid_map: list[tuple[int, int, int]] = field(default_factory=list)  # (inside, outside, count)
    names: dict[int, str] = field(default_factory=dict)  # its /etc/passwd
    digest: bytes = b""  # of what it was read from: a change means read it again
    reachable: bool = True  # False: its overlay's upper directory is not visible here
    # a container: a runtime's cgroup or an overlay root. A service's private namespace
    # (systemd's PrivateTmp) or a plain unshare is the host's, and is read as the host's.
    container: bool = True

    @property
    def watched(self) -> bool:
        return self.container and self.reachable

    def to_container(self, path: Optional[bytes]) -> Optional[bytes]:
        """``path`` as the container sees it; None when it is not the container's."""
        if path is None:
            return None
        for host, inside in self.routes:
            if path == host or path.startswith(host + b"/"):
                rest = path[len(host) :]
                return (inside.rstrip(b"/") + rest) or b"/"
        return None

    def is_work(self, path: Optional[bytes]) -> bool:
        return path is not None and any(path == w or path.startswith(w + b"/") for w in self.work)

    def user(self, host_uid: Optional[int]) -> tuple[Optional[int], Optional[str]]:
        """(uid inside, its name in the container's passwd) for a host uid."""
        if host_uid is None:
            return None, None
        uid: Optional[int] = host_uid
        if self.uid_map:
            uid = next((i + host_uid - o for i, o, n in self.uid_map if o <= host_uid < o + n), None)
        return uid, (self.names.get(uid) if uid is not None else None)


class Containers:
    """Views of the mount namespaces on this host other than the agent's.

    ``view(ns, pid)`` reads (or remembers) the namespace of a process;
    ``scan()`` finds the namespaces of every running process, so that mounts
    only a container has are found as it starts, and forgets the gone."""

    def __init__(self, proc_root: str = "/proc", is_dir: Callable[[bytes], bool] = os.path.isdir) -> None:
        self._proc = proc_root.rstrip("/")
        self._is_dir = is_dir  # whether an upper directory is visible from here
        # the host's namespace is init's: a service's own (systemd's PrivateTmp,
        # ProtectSystem) is still the host, with the host's mounts
        self.host_ns = self._ns(1) or self._ns("self")
        self.own_ns = self._ns("self")
        self._views: dict[int, View] = {}
        self._host_mounts: list[Mount] = []
        self.generation = 0  # bumped when the set of views (or their routes) changes
        self._work: tuple[bytes, ...] = ()
        self._work_at = -1

    # --- lookups -------------------------------------------------------

    def ns_of(self, pid: int) -> Optional[int]:
        return self._ns(pid)

    def view(self, ns: Optional[int], pid: int) -> Optional[View]:
        """The view of namespace ``ns`` (read through ``pid`` when new); None for the host's."""
        if ns is None or ns in (self.host_ns, self.own_ns):
            return None
        v = self._views.get(ns)
        if v is None:
            self.refresh(ns, pid)
            v = self._views.get(ns)
        return v if v is not None and v.watched else None

    def refresh(self, ns: Optional[int], pid: int) -> bool:
        """Read namespace ``ns`` again through ``pid`` (a process that just
        exec'd there: its mounts and cgroup are the container's by now);
        True when the view is new or changed."""
        if ns is None or ns in (self.host_ns, self.own_ns):
            return False
        known = self._views.get(ns)
        try:
            v = self._read(ns, pid, known)
        except Exception as exc:  # noqa: BLE001 - a container's odd files must not stop the sensor
            log.warning("event=container_unreadable ns=%d pid=%d error=%r", ns, pid, exc)
            return False
        if v is None:
            if known is not None and known.pid != pid and self._ns(known.pid) != ns:
                known.pid = pid  # the same view, through a live process (its own mounts are marked by it)
                self.generation += 1
            return False
        if len(self._views) >= MAX_VIEWS:
            self._views.clear()
        self._views[ns] = v
        self.generation += 1
        return True

    def view_for_path(self, path: Optional[bytes]) -> Optional[View]:
        """The container whose overlay layers hold ``path`` (for a writer gone
        before its namespace could be read: a one-line web shell)."""
        if path is None:
            return None
        for v in self.views():
            for host, _inside in v.routes:
                if host != v.root and (path == host or path.startswith(host + b"/")):
                    return v
        return None

    def views(self) -> list[View]:
        """The containers' views (not other namespaces')."""
        return [v for v in self._views.values() if v.watched]

    def is_work(self, path: Optional[bytes]) -> bool:
        """Under any container's overlay work directory (one C-level check per event)."""
        if self._work_at != self.generation:
            self._work = tuple(w + b"/" for v in self.views() for w in v.work)
            self._work_at = self.generation
        return path is not None and bool(self._work) and path.startswith(self._work)

    # --- scanning ------------------------------------------------------

    def scan(self) -> None:
        """Every running process's namespace read; views of gone ones dropped."""
        seen: dict[int, int] = {}
        try:
            pids = [int(d) for d in os.listdir(self._proc) if d.isdigit()]
        except OSError:
            return
        for pid in pids:
            ns = self._ns(pid)
            if ns is not None and ns != self.host_ns:
                seen.setdefault(ns, pid)
        gone = [ns for ns in self._views if ns not in seen]
        for ns in gone:
            del self._views[ns]
        if gone:
            self.generation += 1
        for ns, pid in seen.items():
            v = self._views.get(ns)
            self.refresh(ns, v.pid if v is not None and self._ns(v.pid) == ns else pid)

    def set_host_mounts(self, mounts: list[Mount]) -> None:
        self._host_mounts = mounts

    # --- reading one namespace -----------------------------------------

    def _ns(self, pid: object) -> Optional[int]:
        try:
            return os.stat(f"{self._proc}/{pid}/ns/mnt").st_ino
        except OSError:
            return None

    def _read(self, ns: int, pid: int, known: Optional[View] = None) -> Optional[View]:
        """A view read through ``pid``; None when it is gone or ``known`` is still right."""
        base = f"{self._proc}/{pid}"
        try:
            with open(f"{base}/mountinfo", "rb") as f:
                data = f.read()
            root = os.readlink(f"{base}/root".encode())
            with open(f"{base}/cgroup", "rb") as f:
                cgroup = f.read()
        except OSError:
            return None
        digest = hashlib.blake2b(data + b"\0" + root + b"\0" + cgroup, digest_size=16).digest()
        if known is not None and known.digest == digest:
            return None
        mounts = parse_mountinfo(data)
        info = container_of(cgroup)
        view = View(ns=ns, pid=pid, root=root, info=_named(info), digest=digest)
        view.container = info is not None or any(
            m.mount_point == b"/" and m.fstype == "overlay" for m in mounts
        )
        if not view.container:
            return view
        self._route(view, mounts)
        view.uid_map = _uid_map(f"{base}/uid_map")
        view.names = _passwd(f"{base}/root")
        if known is None or known.info != view.info or known.reachable != view.reachable:
            log.log(
                logging.INFO if view.reachable else logging.DEBUG,
                "event=container_seen ns=%d pid=%d id=%s reachable=%s mounts_only_here=%d",
                ns, pid, info.id if info else None, view.reachable, len(view.own_mounts),
            )  # fmt: skip
        return view

    def _route(self, view: View, mounts: list[Mount]) -> None:
        """The view's host -> container path routes, work dirs and own mounts."""
        routes: list[tuple[bytes, bytes]] = []
        work: list[bytes] = []
        host_devs = {m.dev for m in self._host_mounts}
        for m in mounts:
            if m.fstype == "overlay":
                if not self._overlay(m, routes, work):
                    # its root's writes land where this agent cannot see (another host's
                    # storage, as when agents share a kernel in a test): not ours to watch
                    view.reachable = False
                    return
                merged = _host_source(self._host_mounts, m) if m.dev in host_devs else None
                if merged is not None and merged != b"/":  # docker's .../merged on the host
                    routes.append((merged, m.mount_point))
            elif m.fstype in NOT_CONTAINER_FS:
                continue
            elif m.dev in host_devs:
                source = _host_source(self._host_mounts, m)
                if source is not None and m.mount_point != b"/":
                    routes.append((source, m.mount_point))
            else:
                view.own_mounts.append(m)
        if view.root != b"/":  # chroot: paths in its namespace below its root
            routes.append((view.root.rstrip(b"/"), b"/"))
        routes.sort(key=lambda r: len(r[0]), reverse=True)
        view.routes = routes
        view.work = tuple(work)

    def _overlay(self, m: Mount, routes: list[tuple[bytes, bytes]], work: list[bytes]) -> bool:
        """Routes from an overlay's layers to its mount point; False when its
        upper directory is not visible from here."""
        opts = mount_options(m.super_options)
        upper = opts.get(b"upperdir")
        if upper and not self._is_dir(upper):
            return False
        for key in (b"upperdir", b"lowerdir"):
            for d in opts.get(key, b"").split(b":"):
                if d:
                    routes.append((d.rstrip(b"/"), m.mount_point))
        if opts.get(b"workdir"):
            work.append(opts[b"workdir"].rstrip(b"/"))
        return True


def _host_source(host: list[Mount], m: Mount) -> Optional[bytes]:
    """Where the host sees the directory a bind mount ``m`` shows."""
    best: Optional[Mount] = None
    for h in host:
        if h.dev == m.dev and (m.root == h.root or m.root.startswith(h.root.rstrip(b"/") + b"/")):
            if best is None or len(h.root) > len(best.root):
                best = h
    if best is None:
        return None
    rest = m.root[len(best.root.rstrip(b"/")) :]
    return (best.mount_point.rstrip(b"/") + rest).rstrip(b"/") or b"/"


def _uid_map(path: str) -> list[tuple[int, int, int]]:
    try:
        with open(path, "rb") as f:
            rows = [tuple(int(x) for x in line.split()) for line in f.read().split(b"\n") if line.strip()]
    except (OSError, ValueError):
        return []
    if rows == [(0, 0, 4294967295)]:
        return []  # the host's own map
    return [(r[0], r[1], r[2]) for r in rows if len(r) == 3]


def _passwd(root: str) -> dict[int, str]:
    """uid -> name from a container's /etc/passwd, read as the host's root:
    no symlink followed (one would resolve on the host), a regular file
    only (not a device it made), bounded, no NSS."""
    names: dict[int, str] = {}
    try:
        fd = longpath.open_file(
            os.fsencode(root) + b"/etc/passwd", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        )
    except OSError:
        return names
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return names
        data = os.read(fd, PASSWD_MAX)
    except OSError:
        return names
    finally:
        os.close(fd)
    for line in data.decode("utf-8", "replace").split("\n"):
        parts = line.split(":")
        if len(parts) >= 3 and parts[2].isascii() and parts[2].isdigit():
            names.setdefault(int(parts[2]), parts[0])
    return names


def _named(info: Optional[ContainerInfo]) -> Optional[ContainerInfo]:
    """Docker's name and image, from its own state file (no socket)."""
    if info is None or info.runtime != "docker":
        return info
    try:
        with open(f"/var/lib/docker/containers/{info.id}/config.v2.json", "rb") as f:
            doc = json.loads(f.read(PASSWD_MAX))
        name = str(doc.get("Name") or "").lstrip("/") or None
        image = str((doc.get("Config") or {}).get("Image") or "") or None
    except (OSError, ValueError, AttributeError):
        return info
    return ContainerInfo(id=info.id, runtime=info.runtime, name=name, image=image)
