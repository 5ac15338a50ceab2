"""The opt-in response: move an alert's file into a root-only quarantine
directory, and put it back (``rarewrite agent restore ID``).

The collector asks (an ``actions`` entry in its answer, for a rule with
``quarantine = yes`` in its config); the agent acts only when its own config
says ``quarantine = yes`` for that rule too, on a path it reported itself in
its hour (the pair is in its window, at the host's path: never a
container's file), that is a regular file no installed package owns (a host
without a package database never quarantines). Every action is logged,
written to ``audit.log`` (JSON lines) in the quarantine directory and
reported back as an ``act`` note, which the collector turns into a document
on every output.

Layout: ``<dir>/<qid>/file`` (the content, 0600) and ``<dir>/<qid>/meta.json``
(where it was, its owner, mode and times, its sha256, the alert), written
before the file moves; ``<dir>`` must be a directory of the agent's own user
and no one else may enter it. The web root is an unprivileged user's: every
step on its side goes through a descriptor of the file's directory opened
without following a symlink, so swapping a directory for a symlink between
the checks and the move cannot make root act elsewhere. A file is moved
with rename(2), or copied (fsynced) and then unlinked where rename cannot
cross (another filesystem, another mount).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import uuid
from collections.abc import Callable, Collection
from typing import Any, Optional

from agent.sensor.longpath import open_parent
from agent.shared.text import visible

log = logging.getLogger("rarewrite.quarantine")

META = "meta.json"
CONTENT = b"file"
AUDIT = "audit.log"
DONE = "done"  # alerts already acted on (one a line): an answer repeated is not acted on twice
MAX_ID = (1 << 53) - 1
DONE_KEEP = 10_000  # alerts remembered as acted on
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class QuarantineError(Exception):
    pass


def _b64(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else base64.b64encode(b).decode()


def parse_action(action: Any) -> Optional[tuple[int, str, str, Optional[bytes], Optional[bytes]]]:
    """(id, alert, rule, exe, path) of a collector's action; None if it is not one."""
    try:
        aid = action["id"]
        if isinstance(aid, bool) or not isinstance(aid, int) or not 0 <= aid <= MAX_ID:
            return None
        exe = base64.b64decode(action["exe_b64"], validate=True) if action.get("exe_b64") else None
        path = base64.b64decode(action["path_b64"], validate=True) if action.get("path_b64") else None
        return aid, str(action.get("alert", ""))[:128], str(action.get("rule", ""))[:128], exe or None, path
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


class Quarantine:
    """Carry out the collector's quarantine actions, within the agent's own
    consent (``rules``: ids of the rules with ``quarantine = yes`` here)."""

    def __init__(
        self,
        directory: str,
        rules: Collection[str],
        reported: Callable[[Optional[bytes], Optional[bytes]], bool],
        package_owner: Optional[Callable[[bytes], Any]] = None,
        stub: bool = False,
        now_ms: Callable[[], int] = lambda: 0,
        in_container: Callable[[Optional[bytes], Optional[bytes]], bool] = lambda exe, path: False,
    ) -> None:
        self.dir = directory
        self.rules = frozenset(rules)
        self.reported = reported  # was (exe, path) in this agent's window?
        self.package_owner = package_owner  # None: no package database, nothing is moved
        self.in_container = in_container  # was (exe, path) a container's file (another host path)?
        self.stub = stub
        self.now_ms = now_ms
        self.counters = {"quarantined": 0, "refused": 0, "failed": 0}

    def act(self, action: Any) -> Optional[dict[str, Any]]:
        """One action from the collector; the ``act`` note reporting it (None:
        not an action, or one carried out before and reported already)."""
        parsed = parse_action(action)
        if parsed is None:
            log.warning("event=action_malformed action=%r", str(action)[:200])
            return None
        aid, alert, rule, exe, path = parsed
        try:
            if alert in self._done():
                return None
        except QuarantineError as e:
            log.error("event=quarantine_dir_unsafe why=%r", str(e))
            return None
        act: dict[str, Any] = {"id": aid, "alert": alert, "rule": rule}
        try:
            act["qid"], why = self._quarantine(path, exe, rule, alert, aid)
            act["result"] = "quarantined"
            if why:
                act["why"] = why
        except QuarantineError as e:
            act["result"], act["why"] = "refused", str(e)[:1024]
        except OSError as e:
            act["result"], act["why"] = "failed", f"{e.strerror or e}"[:1024]
        self.counters[act["result"]] += 1
        self._record(act, path)
        return {"ts": self.now_ms(), "exe": exe, "path": path, "kind": "act", "act": act}

    def _record(self, act: dict[str, Any], path: Optional[bytes]) -> None:
        """The action into the done list, the audit log and the agent's log."""
        level = logging.WARNING if act["result"] != "quarantined" else logging.INFO
        log.log(level, "event=quarantine result=%s alert=%s path=%r qid=%s why=%r",
                act["result"], act["alert"], path, act.get("qid"), act.get("why"))  # fmt: skip
        entry = {"action": act["result"], "action_id": act["id"], "alert": act["alert"], "rule": act["rule"],
                 "path_b64": _b64(path), "qid": act.get("qid"), "why": act.get("why"),
                 "at_ms": self.now_ms()}  # fmt: skip
        try:
            fd = self._root_fd()
            try:
                _append(fd, DONE, act["alert"] + "\n")
                _trim(fd, DONE, DONE_KEEP)
                _append(fd, AUDIT, json.dumps(entry, sort_keys=True) + "\n")
            finally:
                os.close(fd)
        except (OSError, QuarantineError) as e:
            log.error("event=quarantine_audit_failed error=%r", str(e))

    def _checked(self, path: Optional[bytes], exe: Optional[bytes], rule: str) -> bytes:
        if rule not in self.rules:
            raise QuarantineError(f"quarantine is not enabled for rule {rule!r} in this agent's config")
        if not path or not path.startswith(b"/"):
            raise QuarantineError("no absolute path")
        if not self.reported(exe, path):
            raise QuarantineError("this agent did not report that file (in its window, since it started)")
        if self.in_container(exe, path):
            raise QuarantineError("a container's file (the host sees it at another path): not moved")
        if self.package_owner is None:
            raise QuarantineError("no package database to rule out a packaged file")
        if self.package_owner(path) is not None:
            raise QuarantineError("an installed package owns the file")
        return path

    def _quarantine(
        self, path: Optional[bytes], exe: Optional[bytes], rule: str, alert: str, aid: int
    ) -> tuple[str, Optional[str]]:
        """(qid, a note on what went wrong after the file was moved)."""
        path = self._checked(path, exe, rule)
        parent, name = open_parent(path)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise QuarantineError("not a regular file (a symlink, directory or device is never moved)")
            if st.st_nlink > 1:
                raise QuarantineError(f"the file has {st.st_nlink} names (hard links): one moved leaves it")
            qid = uuid.uuid4().hex
            meta = _meta(qid, aid, alert, rule, path, exe, st, self.now_ms(), self.stub)
            self._take_in(qid, parent, name, st, meta)
            if self.stub:
                try:
                    os.close(os.open(name, _NEW, 0, dir_fd=parent))
                except OSError as e:  # written again already by the dropper: the file is held all the same
                    return qid, f"no stub left: {e.strerror or e}"
            return qid, None
        finally:
            os.close(parent)

    def _take_in(self, qid: str, parent: int, name: bytes, st: os.stat_result, meta: dict[str, Any]) -> None:
        """The entry ``qid``: its metadata first (a file moved is never one
        restore cannot find), then the file checked (``st``); nothing left of
        the entry if the file did not move (the original is where it was)."""
        root = self._root_fd()
        try:
            os.mkdir(qid, 0o700, dir_fd=root)
            entry = os.open(qid, _DIR, dir_fd=root)
            try:
                _write_json(entry, META, meta)
                meta["sha256"] = _move_in(parent, name, st, entry)
            except BaseException:
                for left in (CONTENT, META.encode()):
                    with contextlib.suppress(OSError):
                        os.unlink(left, dir_fd=entry)
                os.close(entry)
                os.rmdir(qid, dir_fd=root)
                raise
            try:
                _write_json(entry, META, meta)
            finally:
                os.close(entry)
        finally:
            os.close(root)

    def _root_fd(self) -> int:
        """The quarantine directory: made if missing; refused unless it is a
        directory of this user's that no one else may enter."""
        os.makedirs(os.path.dirname(self.dir) or "/", 0o700, exist_ok=True)
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        fd = os.open(self.dir, _DIR)
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            os.close(fd)
            raise QuarantineError(
                f"{self.dir} is not this user's alone (owner {st.st_uid}, mode {st.st_mode & 0o777:o})"
            )
        return fd

    def _done(self) -> set[str]:
        fd = self._root_fd()
        try:
            return {line.strip() for line in _read_text(fd, DONE).splitlines() if line.strip()}
        finally:
            os.close(fd)


def _meta(
    qid: str, aid: int, alert: str, rule: str, path: bytes, exe: Optional[bytes], st: os.stat_result,
    now_ms: int, stub: bool,
) -> dict[str, Any]:  # fmt: skip
    return {
        "qid": qid, "action_id": aid, "alert": alert, "rule": rule, "path_b64": _b64(path),
        "path": visible(path), "exe_b64": _b64(exe),
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size, "atime_ns": st.st_atime_ns,
        "mtime_ns": st.st_mtime_ns, "quarantined_ms": now_ms, "stub": stub,
    }  # fmt: skip


def _move_in(parent: int, name: bytes, st: os.stat_result, entry: int) -> str:
    """The file ``name`` of ``parent`` (the very one checked: same inode) into
    ``entry`` as CONTENT; its sha256."""
    fd = os.open(name, _READ, dir_fd=parent)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise QuarantineError("the file changed while it was being quarantined")
        if _renamed(parent, name, entry, CONTENT):
            moved = os.stat(CONTENT, dir_fd=entry, follow_symlinks=False)
            if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):  # swapped at the last moment: put back
                os.rename(CONTENT, name, src_dir_fd=entry, dst_dir_fd=parent)
                raise QuarantineError("the file changed while it was being quarantined")
            os.chmod(CONTENT, 0o600, dir_fd=entry)
            return _sha256_fd(fd)
        sha = _copy_fd(fd, entry, CONTENT, 0o600)
    finally:
        os.close(fd)
    os.unlink(name, dir_fd=parent)
    return sha


def _renamed(src_dir: int, src: bytes, dst_dir: int, dst: bytes) -> bool:
    """renameat(2); False where it cannot cross (EXDEV: another filesystem,
    or two mounts of one, such as a unit's ReadWritePaths= bind mounts)."""
    try:
        os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
    except OSError as e:
        if e.errno == errno.EXDEV:
            return False
        raise
    return True


# ----------------------------------------------------------------- restore


def entries(directory: str) -> list[dict[str, Any]]:
    """The quarantined files' metadata, oldest first."""
    out = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        try:
            with open(os.path.join(directory, name, META), encoding="utf-8") as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda m: int(m.get("quarantined_ms", 0)))


def restore(directory: str, qid: str, now_ms: int, force: bool = False) -> dict[str, Any]:
    """Put a quarantined file back where it was, with its owner, mode and
    times; refused (QuarantineError) when something else is at that path
    (``force``: only the stub the quarantine left may be replaced)."""
    if not qid.isalnum() or len(qid) != 32:
        raise QuarantineError(f"{qid!r} is not a quarantine id (see: rarewrite agent quarantined)")
    try:
        root = os.open(directory, _DIR)
        entry = os.open(qid, _DIR, dir_fd=root)
    except FileNotFoundError:
        raise QuarantineError(f"no quarantined file {qid} in {directory}") from None
    try:
        meta = json.loads(_read_text(entry, META))
        path = base64.b64decode(meta["path_b64"])
        parent, name = open_parent(path)  # no symlink followed: the web root is not root's
        try:
            _put_back(entry, parent, name, meta, force)
        finally:
            os.close(parent)
        os.unlink(META, dir_fd=entry)
        os.rmdir(qid, dir_fd=root)
        done = {"action": "restored", "qid": qid, "alert": meta.get("alert"), "path_b64": meta["path_b64"]}
        _append(root, AUDIT, json.dumps({**done, "at_ms": now_ms}, sort_keys=True) + "\n")
    finally:
        os.close(entry)
        os.close(root)
    log.warning("event=restored qid=%s path=%r alert=%s", qid, path, meta.get("alert"))
    return dict(meta)


def _put_back(entry: int, parent: int, name: bytes, meta: dict[str, Any], force: bool) -> None:
    try:
        st: Optional[os.stat_result] = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None:
        is_stub = stat.S_ISREG(st.st_mode) and st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0
        if not (force and is_stub):
            raise QuarantineError(f"{meta['path']} exists (--force replaces only the empty stub left there)")
    fd = os.open(CONTENT, _READ, dir_fd=entry)
    try:
        os.fchmod(fd, meta["mode"])
        os.fchown(fd, meta["uid"], meta["gid"])
        os.utime(fd, ns=(meta["atime_ns"], meta["mtime_ns"]))
        if _renamed(entry, CONTENT, parent, name):  # over the stub, when forced
            return
        tmp = b".rarewrite-restore-" + uuid.uuid4().hex.encode()
        try:  # owner, mode and times set through the copy's own descriptor, never its name
            _copy_fd(
                fd,
                parent,
                tmp,
                meta["mode"],
                (meta["uid"], meta["gid"]),
                (meta["atime_ns"], meta["mtime_ns"]),
            )
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            raise
    finally:
        os.close(fd)
    os.unlink(CONTENT, dir_fd=entry)


# ------------------------------------------------------------------- files


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 16):
        h.update(chunk)
    return h.hexdigest()


def _copy_fd(
    fd: int, dir_fd: int, name: bytes, mode: int,
    owner: Optional[tuple[int, int]] = None, times: Optional[tuple[int, int]] = None,
) -> str:  # fmt: skip
    """``fd``'s content into a new file ``name`` of ``dir_fd`` (its sha256),
    fsynced, with ``mode`` (and ``owner``, ``times`` in ns) set on the copy's
    own descriptor."""
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    out = os.open(name, _NEW, 0o600, dir_fd=dir_fd)
    try:
        while chunk := os.read(fd, 1 << 16):
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view) :]
        if owner is not None:
            os.fchown(out, *owner)
        os.fchmod(out, mode)
        if times is not None:
            os.utime(out, ns=times)
        os.fsync(out)
    finally:
        os.close(out)
    return h.hexdigest()


def _write_json(dir_fd: int, name: str, doc: dict[str, Any]) -> None:
    """``name`` in ``dir_fd`` replaced whole (a temp file, fsynced, renamed)."""
    tmp = name + ".tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, _NEW, 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _append(dir_fd: int, name: str, text: str) -> None:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _trim(dir_fd: int, name: str, keep: int) -> None:
    """Keep the last ``keep`` lines of ``name`` once it holds twice as many
    (a collector asks again only while an alert's action is pending)."""
    if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size < keep * 2 * 16:  # ids are longer
        return
    lines = _read_text(dir_fd, name).splitlines()
    if len(lines) > 2 * keep:
        tmp = name + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(tmp, _NEW, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines[-keep:]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _read_text(dir_fd: int, name: str) -> str:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return ""
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        return f.read(16 << 20)
