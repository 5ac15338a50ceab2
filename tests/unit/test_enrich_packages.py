"""PackageIndex: dpkg lists, md5sums and conffiles read from a fake database
in tmp_path, a stand-in rpm module, and the real dpkg database when present."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Optional

import pytest

from agent.sensor.enrich import packages
from agent.sensor.enrich.packages import Owner, PackageIndex


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class FakeDpkg:
    """A dpkg database under ``root/db`` whose packages list files under ``root/fs``."""

    def __init__(self, root: Path) -> None:
        self.db = root / "db"
        self.fs = root / "fs"
        (self.db / "info").mkdir(parents=True)
        self.fs.mkdir()
        self.stanzas: list[str] = []
        self.write_status()

    def path(self, rel: str) -> bytes:
        return os.fsencode(self.fs / rel)

    def add(
        self,
        package: str,
        files: dict[str, bytes],
        dirs: tuple[str, ...] = (),
        conffiles: tuple[str, ...] = (),
    ) -> None:
        lines, sums = [], []
        for d in dirs:
            (self.fs / d).mkdir(parents=True, exist_ok=True)
            lines.append(str(self.fs / d))
        for rel, data in files.items():
            target = self.fs / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            lines.append(str(target))
            if rel not in conffiles:
                sums.append(f"{_md5(data)}  {str(target).lstrip('/')}")
        (self.db / "info" / f"{package}.list").write_text("\n".join(lines) + "\n")
        (self.db / "info" / f"{package}.md5sums").write_text("\n".join(sums) + "\n" if sums else "")
        name = package.partition(":")[0]
        stanza = f"Package: {name}\nStatus: install ok installed\nVersion: 1.0\n"
        if conffiles:
            stanza += "Conffiles:\n" + "".join(f" {self.fs / c} {_md5(files[c])}\n" for c in conffiles)
        stanza += "Description: test\n a package\n"
        self.stanzas.append(stanza)
        self.write_status()

    def write_status(self) -> None:
        (self.db / "status").write_text("\n".join(self.stanzas))


@pytest.fixture
def dpkg(tmp_path: Path) -> FakeDpkg:
    db = FakeDpkg(tmp_path)
    db.add(
        "web-app", {"srv/app/index.php": b"<?php echo 1;\n", "srv/app/lib.php": b"<?php\n"}, dirs=("srv/app",)
    )
    db.add(
        "libc6:amd64",
        {"lib/libc.so": b"\x7fELF libc", "etc/ld.conf": b"include /etc/ld.d\n"},
        dirs=("srv/app", "lib"),
        conffiles=("etc/ld.conf",),
    )
    return db


def test_owned_files_and_unowned(dpkg: FakeDpkg) -> None:
    idx = PackageIndex(dpkg.db)
    assert idx.available()
    assert idx.owner(dpkg.path("srv/app/index.php")) == Owner("dpkg", "web-app", False)
    assert idx.owner(dpkg.path("lib/libc.so")) == Owner("dpkg", "libc6:amd64", False)
    (dpkg.fs / "srv/app/shell.php").write_bytes(b"<?php system($_GET['c']);")
    assert idx.owner(dpkg.path("srv/app/shell.php")) is None
    assert idx.owner(b"/no/such/path") is None


def test_a_changed_file_differs(dpkg: FakeDpkg) -> None:
    idx = PackageIndex(dpkg.db)
    assert idx.owner(dpkg.path("srv/app/lib.php")) == Owner("dpkg", "web-app", False)
    (dpkg.fs / "srv/app/lib.php").write_bytes(b"<?php eval($_POST['x']);")
    assert idx.owner(dpkg.path("srv/app/lib.php")) == Owner("dpkg", "web-app", True)  # not the cached answer


def test_a_conffile_is_compared_with_its_status_md5(dpkg: FakeDpkg) -> None:
    idx = PackageIndex(dpkg.db)
    assert idx.owner(dpkg.path("etc/ld.conf")) == Owner("dpkg", "libc6:amd64", False)
    (dpkg.fs / "etc/ld.conf").write_bytes(b"include /tmp/evil\n")
    assert idx.owner(dpkg.path("etc/ld.conf")) == Owner("dpkg", "libc6:amd64", True)


def test_directories_symlinks_and_large_files_are_not_compared(dpkg: FakeDpkg) -> None:
    # a directory listed by two packages: one of them, no comparison
    assert PackageIndex(dpkg.db).owner(dpkg.path("srv/app")) in (
        Owner("dpkg", "web-app", None),
        Owner("dpkg", "libc6:amd64", None),
    )
    os.unlink(dpkg.path("srv/app/index.php"))
    os.symlink("/etc/passwd", dpkg.path("srv/app/index.php"))
    assert PackageIndex(dpkg.db).owner(dpkg.path("srv/app/index.php")) == Owner("dpkg", "web-app", None)
    small = PackageIndex(dpkg.db, digest_max_bytes=4)
    assert small.owner(dpkg.path("lib/libc.so")) == Owner("dpkg", "libc6:amd64", None)


def test_a_gone_file_is_still_owned_but_not_compared(dpkg: FakeDpkg) -> None:
    os.unlink(dpkg.path("lib/libc.so"))
    assert PackageIndex(dpkg.db).owner(dpkg.path("lib/libc.so")) == Owner("dpkg", "libc6:amd64", None)


def test_no_recorded_digest_is_not_compared(dpkg: FakeDpkg) -> None:
    (dpkg.db / "info" / "web-app.md5sums").unlink()
    assert PackageIndex(dpkg.db).owner(dpkg.path("srv/app/lib.php")) == Owner("dpkg", "web-app", None)


def test_a_new_package_is_seen_after_the_check_interval(dpkg: FakeDpkg) -> None:
    clock = Clock()
    idx = PackageIndex(dpkg.db, check_every_s=30.0, clock=clock)
    new = dpkg.path("srv/app/plugin.php")
    assert idx.owner(new) is None
    dpkg.add("wp-plugin", {"srv/app/plugin.php": b"<?php // plugin\n"})
    os.utime(dpkg.db / "info", ns=(1, 1))  # a changed mtime, whatever the filesystem's resolution
    clock.t += 10
    assert idx.owner(new) is None  # the old index: the interval has not passed yet
    clock.t += 25
    assert idx.owner(new) == Owner("dpkg", "wp-plugin", False)


def test_a_hash_collision_never_names_a_wrong_owner(dpkg: FakeDpkg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages, "_path_hash", lambda path: 0x1234_5678_9ABC_DEF0)
    idx = PackageIndex(dpkg.db)
    (dpkg.fs / "srv/app/shell.php").write_bytes(b"x")
    assert idx.owner(dpkg.path("srv/app/shell.php")) is None
    assert idx.owner(dpkg.path("etc/ld.conf")) == Owner("dpkg", "libc6:amd64", False)
    assert idx.owner(dpkg.path("srv/app/index.php")) == Owner("dpkg", "web-app", False)


def test_an_unreadable_database_is_no_owner(
    dpkg: FakeDpkg, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = os.scandir

    def scandir(path: Any) -> Any:
        if os.fsencode(path).endswith(b"/info"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    idx = PackageIndex(dpkg.db, rpm=None)
    with caplog.at_level(logging.WARNING, logger="rarewrite.enrich"):
        assert idx.owner(dpkg.path("srv/app/index.php")) is None
        assert idx.owner(dpkg.path("lib/libc.so")) is None
        assert not idx.available()
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1


def test_an_unreadable_list_is_skipped(dpkg: FakeDpkg, monkeypatch: pytest.MonkeyPatch) -> None:
    real = packages._read

    def read(path: bytes) -> bytes:
        if path.endswith(b"web-app.list"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(packages, "_read", read)
    idx = PackageIndex(dpkg.db)
    assert idx.owner(dpkg.path("srv/app/index.php")) is None  # listed, but cannot be confirmed
    assert idx.owner(dpkg.path("lib/libc.so")) == Owner("dpkg", "libc6:amd64", False)


def test_an_empty_dpkg_database_leaves_the_choice_to_rpm(tmp_path: Path) -> None:
    (tmp_path / "info").mkdir()  # EPEL's dpkg on a RHEL host: the directory, no package
    rpm = FakeRpm({"httpd": [(str(tmp_path), "")]})
    assert PackageIndex(tmp_path, rpm=rpm).owner(os.fsencode(tmp_path)) == Owner("rpm", "httpd", None)


# --- rpm, through a stand-in for the python3-rpm bindings


class FakeFile:
    def __init__(self, name: str, digest: str) -> None:
        self.name = name
        self.digest = digest


class FakeRpm:
    RPMTAG_NAME = 1000
    RPMTAG_FILEDIGESTALGO = 5011

    def __init__(self, packages_: dict[str, list[tuple[str, str]]], algo: Optional[int] = 8) -> None:
        self.headers = [
            {self.RPMTAG_NAME: name.encode(), self.RPMTAG_FILEDIGESTALGO: algo, "files": files}
            for name, files in packages_.items()
        ]
        self.closed = 0
        self.fail = False

    def TransactionSet(self) -> FakeRpm:  # the bindings' names
        return self

    def dbMatch(self, tag: str, key: bytes) -> list[dict[Any, Any]]:
        if self.fail:
            raise RuntimeError("rpmdb: BDB0113 Thread/process failed")
        assert tag == "basenames"
        return [h for h in self.headers if any(os.fsencode(f) == key for f, _ in h["files"])]

    def closeDB(self) -> None:
        self.closed += 1

    def files(self, hdr: dict[Any, Any]) -> list[FakeFile]:
        return [FakeFile(name, digest) for name, digest in hdr["files"]]


def test_rpm_owner_with_and_without_a_difference(tmp_path: Path) -> None:
    same, changed = tmp_path / "same.conf", tmp_path / "changed.php"
    same.write_bytes(b"ServerName x\n")
    changed.write_bytes(b"<?php system($_GET['c']);")
    rpm = FakeRpm(
        {
            "httpd": [(str(same), hashlib.sha256(b"ServerName x\n").hexdigest()), (str(tmp_path), "")],
            "php": [(str(changed), hashlib.sha256(b"<?php echo 1;").hexdigest())],
        }
    )
    idx = PackageIndex(tmp_path / "no-dpkg", rpm=rpm)
    assert idx.available()
    assert idx.owner(os.fsencode(same)) == Owner("rpm", "httpd", False)
    assert idx.owner(os.fsencode(changed)) == Owner("rpm", "php", True)
    assert idx.owner(os.fsencode(tmp_path)) == Owner("rpm", "httpd", None)
    assert idx.owner(os.fsencode(tmp_path / "other")) is None
    assert rpm.closed >= 4


def test_rpm_md5_digests_and_old_bindings(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"abc")
    rpm = FakeRpm({"pkg": [(str(f), _md5(b"abc"))]}, algo=None)  # no algo tag: md5
    assert PackageIndex(tmp_path / "no-dpkg", rpm=rpm).owner(os.fsencode(f)) == Owner("rpm", "pkg", False)

    class OldRpm(FakeRpm):  # rpm before 4.12: no rpm.files, the header's arrays
        RPMTAG_FILENAMES = 5000
        RPMTAG_FILEDIGESTS = 5001
        files = None  # type: ignore[assignment]

    old = OldRpm({"pkg": []}, algo=1)
    old.headers[0]["files"] = [(str(f), "")]
    old.headers[0][OldRpm.RPMTAG_FILENAMES] = [str(f)]
    old.headers[0][OldRpm.RPMTAG_FILEDIGESTS] = [_md5(b"abd")]
    assert PackageIndex(tmp_path / "no-dpkg", rpm=old).owner(os.fsencode(f)) == Owner("rpm", "pkg", True)


def test_a_broken_rpmdb_is_no_owner(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"abc")
    rpm = FakeRpm({"pkg": [(str(f), _md5(b"abc"))]}, algo=1)
    rpm.fail = True
    clock = Clock()
    idx = PackageIndex(tmp_path / "no-dpkg", rpm=rpm, clock=clock)
    with caplog.at_level(logging.WARNING, logger="rarewrite.enrich"):
        assert idx.owner(os.fsencode(f)) is None
        assert idx.owner(os.fsencode(tmp_path / "b")) is None
    assert len(caplog.records) == 1  # logged once
    rpm.fail = False
    clock.t += 31  # rpm answers age out: the repaired database is asked again
    assert idx.owner(os.fsencode(f)) == Owner("rpm", "pkg", False)


def test_dpkg_takes_precedence_over_rpm(dpkg: FakeDpkg) -> None:
    rpm = FakeRpm({"other": [(os.fsdecode(dpkg.path("srv/app/index.php")), "")]})
    assert PackageIndex(dpkg.db, rpm=rpm).owner(dpkg.path("srv/app/index.php")) == Owner(
        "dpkg", "web-app", False
    )


def test_owner_never_raises(dpkg: FakeDpkg, monkeypatch: pytest.MonkeyPatch) -> None:
    idx = PackageIndex(dpkg.db)

    def boom(*_: Any) -> None:
        raise ValueError("odd")

    monkeypatch.setattr(idx, "_lookup", boom)
    assert idx.owner(dpkg.path("srv/app/index.php")) is None


# --- this machine's own dpkg database


@pytest.mark.skipif(not os.path.isdir("/var/lib/dpkg/info"), reason="no dpkg database here")
def test_the_real_dpkg_database(tmp_path: Path) -> None:
    idx = PackageIndex()
    assert idx.available()
    assert idx.owner(b"/usr/bin/dpkg") == Owner("dpkg", "dpkg", False)
    lookalike = tmp_path / "passwd"
    lookalike.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    assert idx.owner(os.fsencode(lookalike)) is None
    owner = idx.owner(b"/usr/share/doc")
    assert owner is not None and owner.differs is None
