"""Quarantine and restore on real files: what the agent refuses, what it
moves (on one filesystem and across two), the stub, and putting it back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import pytest

from agent.sensor import quarantine
from agent.sensor.quarantine import Quarantine, QuarantineError

RULE = "rule-q"
EXE = b"/usr/sbin/php-fpm8.2"


def action(aid: int, path: bytes, rule: str = RULE) -> dict[str, Any]:
    import base64

    return {"id": aid, "type": "quarantine", "alert": f"alert-{aid}", "rule": rule,
            "exe_b64": base64.b64encode(EXE).decode(), "path_b64": base64.b64encode(path).decode()}  # fmt: skip


class Setup:
    def __init__(self, tmp: Path, qdir: Optional[Path] = None, stub: bool = False) -> None:
        self.web = tmp / "www"
        self.web.mkdir()
        self.qdir = qdir or tmp / "q"
        self.reported: set[bytes] = set()
        self.owned: set[bytes] = set()
        self.q = Quarantine(str(self.qdir), {RULE}, lambda exe, path: path in self.reported,
                            package_owner=lambda p: "pkg" if p in self.owned else None, stub=stub,
                            now_ms=lambda: 1_790_000_000_000)  # fmt: skip

    def shell(self, name: str = "s.php", data: bytes = b"<?php system($_GET['c']);") -> bytes:
        p = self.web / name
        p.write_bytes(data)
        os.chmod(p, 0o640)
        os.utime(p, ns=(1_000_000_000, 2_000_000_000))
        self.reported.add(bytes(p))
        return bytes(p)


def test_it_moves_a_reported_file_and_restore_puts_it_back_as_it_was(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    path = s.shell()
    before = os.stat(path)
    note = s.q.act(action(1, path))
    assert note is not None and note["kind"] == "act" and note["path"] == path
    act = note["act"]
    assert act["result"] == "quarantined" and act["alert"] == "alert-1"
    assert not os.path.exists(path)
    entry = s.qdir / act["qid"]
    assert (s.qdir.stat().st_mode & 0o777, (entry / "file").stat().st_mode & 0o777) == (0o700, 0o600)
    meta = json.loads((entry / "meta.json").read_text())
    assert (meta["mode"], meta["mtime_ns"], meta["size"]) == (0o640, 2_000_000_000, before.st_size)
    assert s.q.act(action(1, path)) is None  # the answer repeated: not acted on twice
    restored = quarantine.restore(str(s.qdir), act["qid"], 0)
    assert restored["alert"] == "alert-1"
    after = os.stat(path)
    assert (after.st_mode & 0o777, after.st_mtime_ns, after.st_uid) == (0o640, 2_000_000_000, before.st_uid)
    assert Path(os.fsdecode(path)).read_bytes() == b"<?php system($_GET['c']);"
    assert quarantine.entries(str(s.qdir)) == []
    with pytest.raises(QuarantineError, match="no quarantined file"):
        quarantine.restore(str(s.qdir), act["qid"], 0)
    audit = [json.loads(x)["action"] for x in (s.qdir / "audit.log").read_text().splitlines()]
    assert audit == ["quarantined", "restored"]


@pytest.mark.parametrize(
    ("prepare", "says"),
    [
        (lambda s, p: s.reported.discard(p), "did not report"),
        (lambda s, p: s.owned.add(p), "package owns"),
        (lambda s, p: (os.unlink(p), os.symlink("/etc/passwd", p)), "not a regular file"),
    ],
)
def test_it_refuses_what_it_must_not_move(tmp_path: Path, prepare: Any, says: str) -> None:
    s = Setup(tmp_path)
    path = s.shell()
    prepare(s, path)
    note = s.q.act(action(2, path))
    assert note is not None and note["act"]["result"] == "refused" and says in note["act"]["why"]
    assert os.path.lexists(path)
    assert s.q.counters["refused"] == 1


def test_a_rule_without_quarantine_here_is_refused_and_a_gone_file_is_a_failure(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    path = s.shell()
    note = s.q.act(action(3, path, rule="other"))
    assert note is not None and note["act"]["result"] == "refused" and "not enabled" in note["act"]["why"]
    os.unlink(path)
    note = s.q.act(action(4, path))
    assert note is not None and note["act"]["result"] == "failed"
    assert s.q.act({"id": "x"}) is None  # malformed: logged, nothing done


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm (a second filesystem)")
def test_across_filesystems_with_a_stub_and_a_forced_restore(tmp_path: Path) -> None:
    import tempfile

    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        s = Setup(tmp_path, qdir=shm / "q", stub=True)
        if os.stat(s.web).st_dev == os.stat(shm).st_dev:
            pytest.skip("tmp_path is on /dev/shm's filesystem")
        path = s.shell()
        note = s.q.act(action(5, path))
        assert note is not None and note["act"]["result"] == "quarantined"
        st = os.stat(path)
        assert st.st_size == 0 and st.st_mode & 0o777 == 0  # the stub
        with pytest.raises(QuarantineError, match="exists"):
            quarantine.restore(str(s.qdir), note["act"]["qid"], 0)
        quarantine.restore(str(s.qdir), note["act"]["qid"], 0, force=True)
        assert os.stat(path).st_mode & 0o777 == 0o640
        assert Path(os.fsdecode(path)).read_bytes().startswith(b"<?php")
    finally:
        import shutil

        shutil.rmtree(shm)


def test_a_symlink_in_the_way_is_never_followed(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    (s.web / "up").mkdir()
    path = bytes(s.web / "up" / "s.php")
    Path(os.fsdecode(path)).write_bytes(b"<?php")
    s.reported.add(path)
    note = s.q.act(action(6, path))
    assert note is not None and note["act"]["result"] == "quarantined"
    # the web user swaps the folder for a symlink to where root must not write
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    os.rmdir(s.web / "up")
    os.symlink(elsewhere, s.web / "up")
    with pytest.raises(OSError):
        quarantine.restore(str(s.qdir), note["act"]["qid"], 0)
    assert list(elsewhere.iterdir()) == []
    assert quarantine.entries(str(s.qdir))[0]["qid"] == note["act"]["qid"]  # still held


def test_an_unsafe_quarantine_dir_and_no_package_database_move_nothing(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    path = s.shell()
    s.q.package_owner = None
    note = s.q.act(action(7, path))
    assert (
        note is not None and note["act"]["result"] == "refused" and "package database" in note["act"]["why"]
    )
    os.chmod(s.qdir, 0o750)  # noqa: S103 - its group could enter it: what must be refused
    s.q.package_owner = lambda p: None
    assert s.q.act(action(8, path)) is None
    assert os.path.exists(path)
    for bad in ({"id": True}, {"id": 1 << 60}, {"id": -1}, {"id": 1, "path_b64": "%%"}, "not a dict"):
        assert quarantine.parse_action(bad) is None


def test_the_done_list_keeps_its_newest_alerts_only(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(40):
            quarantine._append(fd, quarantine.DONE, f"alert-{i:04d}\n")
            quarantine._trim(fd, quarantine.DONE, 5)
    finally:
        os.close(fd)
    kept = (tmp_path / quarantine.DONE).read_text().split()
    assert 5 <= len(kept) <= 10 and kept[-1] == "alert-0039"


def test_a_hard_linked_file_is_refused_and_a_failed_move_leaves_no_entry(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    path = s.shell()
    os.link(path, s.web / "other-name.php")
    note = s.q.act(action(9, path))
    assert note is not None and note["act"]["result"] == "refused" and "hard links" in note["act"]["why"]
    os.unlink(s.web / "other-name.php")
    real = quarantine._move_in

    def swapped(*args: Any) -> str:
        raise QuarantineError("the file changed while it was being quarantined")

    quarantine._move_in = swapped  # type: ignore[assignment]
    try:
        note = s.q.act(action(10, path))
    finally:
        quarantine._move_in = real  # type: ignore[assignment]
    assert note is not None and note["act"]["result"] == "refused"
    assert quarantine.entries(str(s.qdir)) == [] and os.path.exists(path)
    assert [p.name for p in s.qdir.iterdir() if p.is_dir()] == []


def test_a_stub_that_cannot_be_left_still_reports_the_file_quarantined(tmp_path: Path) -> None:
    s = Setup(tmp_path, stub=True)
    path = s.shell()
    real_open = os.open

    def recreated(p: Any, flags: int, *a: Any, **kw: Any) -> int:
        if p == os.path.basename(path) and flags & os.O_CREAT:
            raise FileExistsError(17, "File exists")  # the dropper wrote it again first
        return real_open(p, flags, *a, **kw)

    import unittest.mock

    with unittest.mock.patch.object(quarantine.os, "open", recreated):
        note = s.q.act(action(11, path))
    assert note is not None and note["act"]["result"] == "quarantined" and "no stub" in note["act"]["why"]
    assert quarantine.entries(str(s.qdir))[0]["qid"] == note["act"]["qid"]
