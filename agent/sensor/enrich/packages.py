"""Which installed package owns a path, and whether the file on disk still
has the digest the package recorded for it.

dpkg: the ``.list`` files under ``<dpkg_dir>/info`` are read once into a
compact index (8 bytes a listed path: the high bits of a 64-bit hash with the
package's number in the low bits, sorted for bisect), rebuilt when ``info`` or
``status`` changes. A hash hit is confirmed by reading that package's own
``.list``, so a collision can cost a read but never names a wrong owner. The
packaged digest comes from ``<pkg>.md5sums`` or, for a conffile, the status
file's ``Conffiles:`` field. rpm (only when no dpkg database is found): the
system's ``rpm`` bindings, each call guarded, the database closed after each
query.

Bounds: a file is digested only when it is a regular file of at most
``digest_max_bytes``, opened without following a symlink; answers are cached
per path for a few thousand paths and dropped when the database changes (rpm:
every ``check_every_s``). Not handled: dpkg diversions. A merged-/usr alias
(``/usr/bin/x`` listed as ``/bin/x``) is tried when the first form is not
listed. ``owner`` never raises: an unreadable database reads as no owner and
is logged once.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import logging
import os
import stat
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple, Optional, Union

from agent.sensor import longpath

log = logging.getLogger("rarewrite.enrich")

CACHE_ENTRIES = 4096
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_MERGED_USR = (b"bin", b"sbin", b"lib", b"lib32", b"lib64", b"libx32")
# rpm's PGPHASHALGO numbers; a header without the tag uses md5
_RPM_DIGESTS = {1: "md5", 2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
_HEX = frozenset(b"0123456789abcdef")

_Sig = Optional[tuple[int, int, int, int, int, int]]


class Owner(NamedTuple):
    manager: str  # "dpkg" or "rpm"
    package: str  # as the manager names it: dpkg's "libc6:amd64", the .list file's stem
    differs: Optional[bool]  # None: not compared (not a regular file, too large, no digest, unreadable)


def _path_hash(path: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(path, digest_size=8).digest(), "big")


def _read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class _DpkgDb:
    """One build of the index of ``<dpkg_dir>/info``."""

    def __init__(self, info: bytes, status: bytes, stems: list[bytes], keys: array[int]) -> None:
        self.info = info
        self.status = status
        self.stems = stems
        self.keys = keys
        self.bits = max(1, len(stems).bit_length())
        self._conffiles: Optional[dict[bytes, str]] = None

    def owner(self, path: bytes) -> Optional[str]:
        """The first package whose .list really names ``path``."""
        mask = (1 << self.bits) - 1
        top = _path_hash(path) & ~mask
        i = bisect.bisect_left(self.keys, top)
        while i < len(self.keys) and self.keys[i] & ~mask == top:
            stem = self.stems[self.keys[i] & mask]
            if self._lists(stem, path):
                return os.fsdecode(stem)
            i += 1
        return None

    def _lists(self, stem: bytes, path: bytes) -> bool:
        try:
            data = _read(self.info + b"/" + stem + b".list")
        except OSError:
            return False
        return (b"\n" + data + b"\n").find(b"\n" + path + b"\n") >= 0

    def md5(self, package: str, listed: bytes) -> Optional[str]:
        """The md5 dpkg recorded for ``listed``: its md5sums line, else its conffile entry."""
        try:
            data = b"\n" + _read(self.info + b"/" + os.fsencode(package) + b".md5sums") + b"\n"
        except OSError:
            data = b""
        needle = b"  " + listed.lstrip(b"/") + b"\n"
        at = data.find(needle)
        while at >= 0:
            if at >= 33 and data[at - 33 : at - 32] == b"\n":
                return _md5_hex(data[at - 32 : at])
            at = data.find(needle, at + 1)
        return self.conffiles().get(listed)

    def conffiles(self) -> dict[bytes, str]:
        """Every conffile's md5 from the status file, read once a build (a few hundred lines)."""
        if self._conffiles is None:
            try:
                self._conffiles = _conffiles(_read(self.status))
            except OSError:
                self._conffiles = {}
        return self._conffiles


def _md5_hex(raw: bytes) -> Optional[str]:
    raw = raw.lower()
    return raw.decode() if len(raw) == 32 and set(raw) <= _HEX else None


def _conffiles(status: bytes) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    inside = False
    for line in status.split(b"\n"):
        if not line.startswith(b" "):
            inside = line.startswith(b"Conffiles:")
            continue
        if not inside:
            continue
        entry = line.strip()
        for flag in (b" obsolete", b" remove-on-upgrade"):
            if entry.endswith(flag):
                entry = entry[: -len(flag)]
        name, _, md5 = entry.rpartition(b" ")
        digest = _md5_hex(md5)
        if name and digest is not None:
            out.setdefault(name, digest)
    return out


def _build_dpkg(dpkg_dir: bytes, warn: Callable[[str, str], None]) -> Optional[_DpkgDb]:
    """The index of every .list under ``dpkg_dir``/info; None when there is none."""
    info = dpkg_dir + b"/info"
    try:
        with os.scandir(info) as it:
            stems = sorted(e.name[:-5] for e in it if e.name.endswith(b".list"))
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):
            warn("dpkg-dir", f"dpkg database {os.fsdecode(info)!r} unreadable: {exc}")
        return None
    if not stems:
        return None
    mask = (1 << max(1, len(stems).bit_length())) - 1
    # bucketed by the top byte so each sort is small: the whole index is never a list of ints
    buckets = [array("Q") for _ in range(256)]
    for num, stem in enumerate(stems):
        try:
            with open(info + b"/" + stem + b".list", "rb") as f:
                for raw in f:  # a line at a time: a split of a 50k-line list would be the peak
                    line = raw.rstrip(b"\n")
                    if line:
                        key = (_path_hash(line) & ~mask) | num
                        buckets[key >> 56].append(key)
        except OSError as exc:
            warn("dpkg-list", f"dpkg list {os.fsdecode(stem)!r} unreadable: {exc}")
    keys = array("Q")
    while buckets:
        keys.extend(sorted(set(buckets.pop(0))))
    return _DpkgDb(info, dpkg_dir + b"/status", stems, keys)


def _merged_usr() -> tuple[bytes, ...]:
    out = []
    for d in _MERGED_USR:
        try:
            target = os.readlink(b"/" + d)
        except OSError:
            continue
        if target.rstrip(b"/") in (b"usr/" + d, b"/usr/" + d):
            out.append(d)
    return tuple(out)


def _aliases(path: bytes, merged: tuple[bytes, ...]) -> Iterator[bytes]:
    yield path
    for d in merged:
        if path.startswith(b"/usr/" + d + b"/"):
            yield path[4:]
        elif path.startswith(b"/" + d + b"/"):
            yield b"/usr" + path


def _sig(st: Optional[os.stat_result]) -> _Sig:
    if st is None:
        return None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _digest(path: bytes, algo: str, max_bytes: int) -> Optional[str]:
    """The hex digest of the regular file at ``path``; None past ``max_bytes`` or unreadable."""
    try:
        fd = longpath.open_file(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        h = hashlib.new(algo)
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(1 << 20, remaining))
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
            remaining -= len(chunk)
        return None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _text(value: Any) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)


def _rpm_digest(rpm: Any, hdr: Any, path: bytes) -> tuple[str, str]:
    """(hashlib name, hex digest) the package recorded for ``path``; "" when none."""
    algo_tag = getattr(rpm, "RPMTAG_FILEDIGESTALGO", None)
    algo = _RPM_DIGESTS.get(int((hdr[algo_tag] if algo_tag is not None else None) or 1), "")
    files = getattr(rpm, "files", None)
    if files is not None:
        pairs: Any = ((f.name, f.digest) for f in files(hdr))
    else:  # rpm before 4.12: the header's parallel arrays
        pairs = zip(hdr[rpm.RPMTAG_FILENAMES] or (), hdr[rpm.RPMTAG_FILEDIGESTS] or ())
    for name, digest in pairs:
        if os.fsencode(_text(name)) == path:
            return algo, _text(digest or "").lower()
    return algo, ""


class PackageIndex:
    """``owner(path)``: the installed package that lists ``path`` (None: none
    does), and whether the file differs from the packaged one. dpkg is used
    when ``<dpkg_dir>/info`` holds any ``.list``; otherwise rpm, when its
    bindings import (or a stand-in is given as ``rpm``)."""

    def __init__(
        self,
        dpkg_dir: Union[bytes, str] = "/var/lib/dpkg",
        rpm: Any = None,
        check_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        digest_max_bytes: int = 64 << 20,
    ) -> None:
        self._dpkg_dir = os.fsencode(dpkg_dir).rstrip(b"/") or b"/"
        self._rpm_given = rpm
        self._check_every_s = check_every_s
        self._clock = clock
        self.digest_max_bytes = digest_max_bytes
        self._db: Optional[_DpkgDb] = None
        self._rpm: Any = None
        self._merged: tuple[bytes, ...] = ()
        self._built = False
        self._db_sig: tuple[Optional[int], Optional[int]] = (None, None)
        self._checked = 0.0
        self._cache: OrderedDict[bytes, tuple[_Sig, Optional[Owner]]] = OrderedDict()
        self._warned: set[str] = set()

    def available(self) -> bool:
        """A package database was found (and read) on this host."""
        try:
            self._refresh()
        except Exception as exc:  # noqa: BLE001 - a broken database never stops the agent
            self._warn("refresh", f"package database unreadable: {exc}")
        return self._db is not None or self._rpm is not None

    def owner(self, path: bytes, pre: Optional[longpath.Stat] = None) -> Optional[Owner]:
        """``pre``: the file's lstat already read (None: read it here)."""
        try:
            self._refresh()
            return self._cached(path, pre)
        except Exception as exc:  # noqa: BLE001 - enrichment must never stop the agent
            self._warn("owner", f"package lookup of {path!r} failed: {exc}")
            return None

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _dpkg_sig(self) -> tuple[Optional[int], Optional[int]]:
        out: list[Optional[int]] = []
        for name in (b"/info", b"/status"):
            try:
                out.append(os.stat(self._dpkg_dir + name).st_mtime_ns)
            except OSError:
                out.append(None)
        return out[0], out[1]

    def _refresh(self) -> None:
        now = self._clock()
        if self._built and now - self._checked < self._check_every_s:
            return
        self._checked = now
        sig = self._dpkg_sig()
        if self._built and sig == self._db_sig:
            if self._rpm is not None:  # rpm's database is not watched: its answers age out instead
                self._cache.clear()
            return
        self._built, self._db_sig = True, sig
        self._cache.clear()
        self._db = None  # the old index is freed before the new one is built
        self._db = _build_dpkg(self._dpkg_dir, self._warn)
        self._rpm = None if self._db is not None else self._load_rpm()
        self._merged = _merged_usr()

    def _load_rpm(self) -> Any:
        if self._rpm_given is not None:
            return self._rpm_given
        try:
            return importlib.import_module("rpm")
        except ImportError:
            return None
        except Exception as exc:  # noqa: BLE001 - odd bindings are no database
            self._warn("rpm-import", f"rpm bindings unusable: {exc}")
            return None

    def _cached(self, path: bytes, pre: Optional[longpath.Stat]) -> Optional[Owner]:
        try:
            st: Optional[os.stat_result] = longpath.stat_of(path, pre)
        except OSError:
            st = None
        sig = _sig(st)
        hit = self._cache.get(path)
        if hit is not None and hit[0] == sig:  # the same file as last time: same answer
            self._cache.move_to_end(path)
            return hit[1]
        answer = self._lookup(path, st)
        self._cache[path] = (sig, answer)
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return answer

    def _lookup(self, path: bytes, st: Optional[os.stat_result]) -> Optional[Owner]:
        comparable = st is not None and stat.S_ISREG(st.st_mode) and st.st_size <= self.digest_max_bytes
        for listed in _aliases(path, self._merged):
            if self._db is not None:
                package = self._db.owner(listed)
                if package is not None:
                    md5 = self._db.md5(package, listed) if comparable else None
                    return Owner("dpkg", package, self._differs(path, "md5", md5))
            elif self._rpm is not None:
                found = self._rpm_owner(listed, path, comparable)
                if found is not None:
                    return found
        return None

    def _differs(self, path: bytes, algo: str, expected: Optional[str]) -> Optional[bool]:
        if not expected or not algo:
            return None
        actual = _digest(path, algo, self.digest_max_bytes)
        return None if actual is None else actual != expected

    def _rpm_owner(self, listed: bytes, path: bytes, comparable: bool) -> Optional[Owner]:
        rpm = self._rpm
        try:
            ts = rpm.TransactionSet()
            try:
                for hdr in ts.dbMatch("basenames", listed):
                    algo, digest = _rpm_digest(rpm, hdr, listed) if comparable else ("", "")
                    return Owner("rpm", _text(hdr[rpm.RPMTAG_NAME]), self._differs(path, algo, digest))
            finally:
                close = getattr(ts, "closeDB", None)
                if close is not None:  # a held rpmdb can hold its locks
                    close()
        except Exception as exc:  # noqa: BLE001 - a broken rpmdb must never stop the agent
            self._warn("rpm", f"rpm query failed: {exc}")
        return None
