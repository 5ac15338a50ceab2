"""The opt-in response: move an alert's file into a root-only quarantine
directory, and put it back (``rarewrite agent restore ID``).

The collector asks (an ``actions`` entry in its answer, for a rule with
``quarantine = yes`` in its config); the agent acts only when its own config
says ``quarantine = yes`` for that rule too, on a path it reported itself in
its hour (the pair is in its window), that is a regular file no installed
package owns. Every action is logged, written to ``audit.log`` (JSON lines)
in the quarantine directory and reported back as an ``act`` note, which the
collector turns into a document on every output.

Layout: ``<dir>/<qid>/file`` (the content, 0600) and ``<dir>/<qid>/meta.json``
(where it was, its owner, mode and times, its sha256, the alert); ``<dir>``
is 0700 and root's. A file is moved with rename(2) when the quarantine is on
its filesystem, else copied (fsynced) and then unlinked, so it is never lost
half-way: until the unlink, the original is still in place.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import stat
import uuid
from collections.abc import Callable, Collection
from typing import Any, Optional

log = logging.getLogger("rarewrite.quarantine")

META = "meta.json"
CONTENT = "file"
AUDIT = "audit.log"
DONE = "done"  # action ids already carried out (one a line): an answer repeated is not acted on twice


class QuarantineError(Exception):
    pass


def _b64(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else base64.b64encode(b).decode()


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
    ) -> None:
        self.dir = directory
        self.rules = frozenset(rules)
        self.reported = reported  # was (exe, path) in this agent's window?
        self.package_owner = package_owner
        self.stub = stub
        self.now_ms = now_ms
        self.counters = {"quarantined": 0, "refused": 0, "failed": 0}

    # ------------------------------------------------------------ acting

    def act(self, action: dict[str, Any]) -> Optional[dict[str, Any]]:
        """One action from the collector; the ``act`` note reporting it (None:
        carried out before, already reported)."""
        try:
            aid = int(action["id"])
            alert, rule = str(action.get("alert", ""))[:128], str(action.get("rule", ""))[:128]
            exe = None if action.get("exe_b64") is None else base64.b64decode(action["exe_b64"])
            path = None if action.get("path_b64") is None else base64.b64decode(action["path_b64"])
        except (KeyError, TypeError, ValueError):
            log.warning("event=action_malformed action=%r", str(action)[:200])
            return None
        if aid in self._done():
            return None
        note: dict[str, Any] = {"ts": self.now_ms(), "exe": exe, "path": path, "kind": "act"}
        act: dict[str, Any] = {"id": aid, "alert": alert, "rule": rule}
        try:
            act["qid"] = self._quarantine(path, exe, rule, alert, aid)
            act["result"] = "quarantined"
        except QuarantineError as e:
            act["result"], act["why"] = "refused", str(e)[:1024]
        except OSError as e:
            act["result"], act["why"] = "failed", f"{e.strerror or e}"[:1024]
        self.counters[act["result"]] += 1
        note["act"] = act
        self._mark_done(aid)
        self._audit({"action": act["result"], "action_id": aid, "alert": alert, "rule": rule,
                     "path_b64": _b64(path), "qid": act.get("qid"), "why": act.get("why")})  # fmt: skip
        level = logging.WARNING if act["result"] != "quarantined" else logging.INFO
        log.log(level, "event=quarantine result=%s alert=%s path=%r qid=%s why=%r", act["result"], alert,
                path, act.get("qid"), act.get("why"))  # fmt: skip
        return note

    def _quarantine(
        self, path: Optional[bytes], exe: Optional[bytes], rule: str, alert: str, aid: int
    ) -> str:
        if rule not in self.rules:
            raise QuarantineError(f"quarantine is not enabled for rule {rule!r} in this agent's config")
        if not path or not path.startswith(b"/"):
            raise QuarantineError("no absolute path")
        if not self.reported(exe, path):
            raise QuarantineError("this agent did not report that file in its window")
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise QuarantineError("not a regular file (a symlink, directory or device is never moved)")
        if self.package_owner is not None and self.package_owner(path) is not None:
            raise QuarantineError("an installed package owns the file")
        qid = uuid.uuid4().hex
        entry = os.path.join(self._root(), qid)
        os.mkdir(entry, 0o700)
        sha = self._move(path, st, os.path.join(entry, CONTENT))
        meta = {
            "qid": qid, "action_id": aid, "alert": alert, "rule": rule,
            "path_b64": _b64(path), "path": path.decode("utf-8", "backslashreplace"), "exe_b64": _b64(exe),
            "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size,
            "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns, "sha256": sha,
            "quarantined_ms": self.now_ms(), "stub": self.stub,
        }  # fmt: skip
        _write_json(os.path.join(entry, META), meta)
        if self.stub:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0)
            os.close(fd)
        return qid

    def _move(self, path: bytes, st: os.stat_result, dest: str) -> str:
        """The file to ``dest`` (its sha256): rename(2) on one filesystem,
        else a copy of the very file checked (O_NOFOLLOW, same inode), then unlink."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise QuarantineError("the file changed while it was being quarantined")
            if now.st_dev == os.stat(os.path.dirname(dest)).st_dev and _renamed(path, os.fsencode(dest)):
                os.chmod(dest, 0o600)
                return _sha256_fd(fd)
            sha = _copy_fd(fd, dest)
        finally:
            os.close(fd)
        os.unlink(path)
        return sha

    def _root(self) -> str:
        """The quarantine directory, made root-only (an existing one is re-tightened)."""
        os.makedirs(self.dir, 0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        return self.dir

    def _done(self) -> set[int]:
        try:
            with open(os.path.join(self.dir, DONE), encoding="ascii") as f:
                return {int(line) for line in f if line.strip().isdigit()}
        except OSError:
            return set()

    def _mark_done(self, aid: int) -> None:
        with open(os.path.join(self._root(), DONE), "a", encoding="ascii") as f:
            f.write(f"{aid}\n")

    def _audit(self, entry: dict[str, Any]) -> None:
        audit(self._root(), {**entry, "at_ms": self.now_ms()})


# ----------------------------------------------------------------- restore


def audit(directory: str, entry: dict[str, Any]) -> None:
    with open(os.path.join(directory, AUDIT), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    entry = os.path.join(directory, qid)
    try:
        with open(os.path.join(entry, META), encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise QuarantineError(f"no quarantined file {qid} in {directory}") from None
    path = base64.b64decode(meta["path_b64"])
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        is_stub = stat.S_ISREG(st.st_mode) and st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0
        if not (force and is_stub):
            raise QuarantineError(f"{meta['path']} exists (--force replaces only the empty stub left there)")
    src = os.path.join(entry, CONTENT)
    os.chmod(src, meta["mode"])
    os.chown(src, meta["uid"], meta["gid"])
    os.utime(src, ns=(meta["atime_ns"], meta["mtime_ns"]))
    same_fs = os.stat(src).st_dev == os.stat(os.path.dirname(path)).st_dev
    if not (same_fs and _renamed(os.fsencode(src), path)):  # over the stub, when forced
        _restore_copy(src, path, meta)
    os.unlink(os.path.join(entry, META))
    os.rmdir(entry)
    done = {"action": "restored", "qid": qid, "alert": meta.get("alert"), "path_b64": meta["path_b64"]}
    audit(directory, {**done, "at_ms": now_ms})
    log.warning("event=restored qid=%s path=%r alert=%s", qid, path, meta.get("alert"))
    return dict(meta)


def _restore_copy(src: str, path: bytes, meta: dict[str, Any]) -> None:
    tmp = path + b".rarewrite-restore"
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _copy_fd(fd, os.fsdecode(tmp))
    finally:
        os.close(fd)
    os.chmod(tmp, meta["mode"])
    os.chown(tmp, meta["uid"], meta["gid"])
    os.utime(tmp, ns=(meta["atime_ns"], meta["mtime_ns"]))
    os.rename(tmp, path)
    os.unlink(src)


def _renamed(src: bytes, dest: bytes) -> bool:
    """rename(2), False where it cannot cross (EXDEV: two mounts of one
    filesystem, such as a service's ReadWritePaths= bind mounts)."""
    try:
        os.rename(src, dest)
    except OSError as e:
        if e.errno == errno.EXDEV:
            return False
        raise
    return True


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 16):
        h.update(chunk)
    return h.hexdigest()


def _copy_fd(fd: int, dest: str) -> str:
    h = hashlib.sha256()
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while chunk := os.read(fd, 1 << 16):
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view) :]
        os.fsync(out)
    finally:
        os.close(out)
    return h.hexdigest()


def _write_json(path: str, doc: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
