"""InotifySource against the real kernel, in a temp dir (no root needed)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

pyinotify = pytest.importorskip("pyinotify")

from agent.sensor.sources import inotify as mod  # noqa: E402
from agent.sensor.sources.inotify import InotifySource, parse_events  # noqa: E402
from agent.shared.clock import FakeClock  # noqa: E402
from agent.shared.errors import SourceError  # noqa: E402
from agent.shared.events import CREATION, OVERFLOW, RENAME, RawEvent  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tree(tmp_path: Path) -> bytes:
    root = tmp_path / "www"
    (root / "excluded").mkdir(parents=True)
    (root / "state").mkdir()
    (root / "sub").mkdir()
    (tmp_path / "outside").mkdir()
    return os.fsencode(root)


@pytest.fixture
def source(tree: bytes) -> Iterator[InotifySource]:
    src = InotifySource([tree], [tree + b"/excluded"], ignore=[tree + b"/state"], clock=FakeClock())
    src.start()
    yield src
    src.close()


def drain(
    src: InotifySource, until: Callable[[list[RawEvent]], bool] | None = None, timeout: float = 5.0
) -> list[RawEvent]:
    """Read until ``until(events)`` holds, or until the queue stays quiet."""
    events: list[RawEvent] = []
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        got = src.read(0.05)
        events.extend(got)
        if until is not None and until(events):
            break
        quiet = 0 if got else quiet + 1
        if until is None and quiet >= 4:
            break
    return events


def paths(events: Sequence[RawEvent], kind: str = CREATION) -> list[bytes]:
    return [e.path for e in events if e.kind == kind and e.path is not None]


def test_creation_exact_bytes(source: InotifySource, tree: bytes) -> None:
    names = [b"shell.php", b"bad\xff\xfe.php", b"new\nline.php", b"sp ace\t.php"]
    for n in names:
        with open(tree + b"/sub/" + n, "wb"):
            pass
    os.mkdir(tree + b"/sub/d\xe9")
    events = drain(source, lambda ev: len(ev) >= len(names) + 1)
    assert sorted(paths(events)) == sorted([tree + b"/sub/" + n for n in names] + [tree + b"/sub/d\xe9"])
    by_path = {e.path: e for e in events}
    assert by_path[tree + b"/sub/d\xe9"].is_dir
    assert not by_path[tree + b"/sub/shell.php"].is_dir
    assert all(e.pid is None and e.ts_ms == FakeClock().now_ms() for e in events)
    assert source.stats()["seen"] == len(names) + 1


def test_new_non_utf8_directory_is_watched(source: InotifySource, tree: bytes) -> None:
    d = tree + b"/\xff\xfedir"
    os.mkdir(d)
    drain(source, lambda ev: d in paths(ev))
    with open(d + b"/x\x80.php", "wb"):
        pass
    events = drain(source, bool)
    assert paths(events) == [d + b"/x\x80.php"]
    assert source.stats()["watch_errors"] == 0


def test_rename_within_tree_has_original_path(source: InotifySource, tree: bytes) -> None:
    src, dst = tree + b"/sub/up\xff.tmp", tree + b"/sub/up\xff.php"
    with open(src, "wb"):
        pass
    drain(source, bool)
    os.rename(src, dst)
    events = drain(source, lambda ev: bool(paths(ev, RENAME)))
    assert [(e.kind, e.path, e.original_path) for e in events] == [(RENAME, dst, src)]


def test_rename_from_outside_and_out_of_the_tree(source: InotifySource, tree: bytes) -> None:
    outside = os.path.dirname(tree) + b"/outside"
    with open(outside + b"/a", "wb"):
        pass
    os.rename(outside + b"/a", tree + b"/sub/a.php")
    os.rename(tree + b"/sub/a.php", outside + b"/b")  # the destination counts: nothing
    events = drain(source)
    assert [(e.kind, e.path, e.original_path) for e in events] == [(RENAME, tree + b"/sub/a.php", None)]


def test_outside_excluded_and_ignored_produce_nothing(source: InotifySource, tree: bytes) -> None:
    outside = os.path.dirname(tree) + b"/outside"
    for d in (outside, tree + b"/excluded", tree + b"/state"):
        with open(d + b"/f", "wb"):
            pass
        os.makedirs(d + b"/deep/er")
        with open(d + b"/deep/er/f", "wb"):
            pass
    os.makedirs(tree + b"/sub/excluded")  # same name deeper down is not excluded
    events = drain(source)
    assert paths(events) == [tree + b"/sub/excluded"]
    watched = {w.path for w in source._wm.watches.values()}
    assert os.fsdecode(tree + b"/excluded") not in watched
    assert os.fsdecode(tree + b"/state") not in watched


def test_mkdir_p_burst_every_file_once(source: InotifySource, tree: bytes) -> None:
    # Everything is created before the source reads anything: the worst case.
    d = tree + b"/burst"
    os.mkdir(d)
    expected = []
    for i in range(200):
        d += b"/d%d" % i
        os.mkdir(d)
        expected.append(d)
        for j in range(5):
            f = d + b"/f%d" % j
            with open(f, "wb"):
                pass
            expected.append(f)
    events = drain(source)
    got = paths(events)
    assert sorted(got) == sorted([tree + b"/burst", *expected])
    assert len(got) == len(set(got)), "duplicates"
    # and the new directories are watched from now on
    with open(d + b"/late.php", "wb"):
        pass
    assert paths(drain(source)) == [d + b"/late.php"]


def test_burst_while_reading_no_loss_no_duplicates(source: InotifySource, tree: bytes) -> None:
    # A writer racing the reader: watches land while the tree grows.
    expected: list[bytes] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for k in range(20):
                d = tree + b"/race%d" % k
                os.mkdir(d)
                expected.append(d)
                for i in range(10):
                    d += b"/n%d" % i
                    os.mkdir(d)
                    expected.append(d)
                    for j in range(5):
                        with open(d + b"/f%d" % j, "wb"):
                            pass
                        expected.append(d + b"/f%d" % j)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    events: list[RawEvent] = []
    t.start()
    deadline = time.monotonic() + 20
    while not done.is_set() and time.monotonic() < deadline:
        events.extend(source.read(0.01))
    t.join()
    events.extend(drain(source))
    got = paths(events)
    assert sorted(got) == sorted(expected)
    assert len(got) == len(set(got)), "duplicates"


def test_moved_directory_keeps_right_paths(source: InotifySource, tree: bytes) -> None:
    os.makedirs(tree + b"/sub/a/b")
    drain(source)
    os.rename(tree + b"/sub/a", tree + b"/sub/z")
    drain(source)
    with open(tree + b"/sub/z/b/f.php", "wb"):
        pass
    assert paths(drain(source)) == [tree + b"/sub/z/b/f.php"]


def test_directory_moved_out_is_forgotten(source: InotifySource, tree: bytes) -> None:
    outside = os.path.dirname(tree) + b"/outside"
    os.makedirs(tree + b"/sub/a/b")
    drain(source)
    before = source.stats()["watches"]
    os.rename(tree + b"/sub/a", outside + b"/a")
    drain(source)
    with open(outside + b"/a/b/f.php", "wb"):
        pass
    assert drain(source) == []
    assert source.stats()["watches"] == before - 2


def test_overflow_is_reported_and_counted(source: InotifySource, tree: bytes) -> None:
    # A real overflow needs a full kernel queue (max_queued_events, root to
    # lower); feed pyinotify the record the kernel would send instead.
    source._notifier.append_event(pyinotify._RawEvent(-1, mod.IN_Q_OVERFLOW, 0, ""))
    with open(tree + b"/sub/f", "wb"):
        pass
    events = drain(source, lambda ev: len(ev) >= 2)
    assert [(e.kind, e.path, e.lost) for e in events] == [
        (OVERFLOW, None, 0),
        (CREATION, tree + b"/sub/f", 0),
    ]
    assert source.stats()["overflows"] == 1


def test_overflow_rewatches_lost_directories(source: InotifySource, tree: bytes) -> None:
    source._wm.ignore_events = True
    os.makedirs(tree + b"/sub/lost")
    drain(source)
    source._wm.ignore_events = False
    source._notifier.append_event(pyinotify._RawEvent(-1, mod.IN_Q_OVERFLOW, 0, ""))
    with open(tree + b"/sub/f", "wb"):
        pass
    drain(source, lambda ev: len(ev) >= 2)
    with open(tree + b"/sub/lost/g", "wb"):
        pass
    assert paths(drain(source)) == [tree + b"/sub/lost/g"]


class _FullAdder(mod._AddWatch):
    """inotify_add_watch as it fails once fs.inotify.max_user_watches is used up."""

    def __call__(self, fd: int, pathname: str, mask: int) -> int:
        self.last_errno = errno.ENOSPC
        ctypes.set_errno(errno.ENOSPC)
        return -1


def test_watch_limit_counted_logged_once_no_crash(
    source: InotifySource, tree: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    full = _FullAdder()
    source._adder = full
    source._wm._inotify_wrapper._inotify_add_watch = full
    with caplog.at_level(logging.ERROR, logger="rarewrite.sources.inotify"):
        os.makedirs(tree + b"/sub/n1/n2")
        with open(tree + b"/sub/n1/n2/f", "wb"):
            pass
        os.mkdir(tree + b"/sub/n3")
        events = drain(source)
    # still reported: the rescan lists what it cannot watch
    assert sorted(paths(events)) == sorted(
        [tree + b"/sub/n1", tree + b"/sub/n1/n2", tree + b"/sub/n1/n2/f", tree + b"/sub/n3"]
    )
    assert source.stats()["watch_errors"] == 3
    lines = [r.getMessage() for r in caplog.records if "watch_limit" in r.getMessage()]
    assert len(lines) == 1
    assert "sysctl fs.inotify.max_user_watches" in lines[0]


def test_stats_close_and_missing_roots(tmp_path: Path, tree: bytes) -> None:
    missing = os.fsencode(tmp_path / "nope")
    src = InotifySource([tree, missing], [], clock=FakeClock())
    src.start()
    st = src.stats()
    assert st["backend"] == "inotify"
    assert {"seen", "overflows", "watches", "watch_errors", "marked", "refused"} <= set(st)
    assert st["marked"] == [os.fsdecode(tree)]
    assert st["refused"] == [{"path": os.fsdecode(missing), "reason": "no such directory"}]
    assert st["watches"] == 4  # www, excluded, state, sub: nothing excluded here
    src.close()
    src.close()
    assert src.read(0.01) == []
    assert src.stats()["watches"] == 0


def test_nothing_watchable_is_a_source_error(tmp_path: Path) -> None:
    src = InotifySource([os.fsencode(tmp_path / "nope")], [])
    with pytest.raises(SourceError, match="no such directory"):
        src.start()
    src.close()


def test_missing_pyinotify_is_a_source_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyinotify", None)
    src = InotifySource([os.fsencode(tmp_path)], [])
    with pytest.raises(SourceError, match="pyinotify"):
        src.start()


def test_parse_events_keeps_bytes() -> None:
    name = b"a\xff\n.php"
    padded = name + b"\0" * (16 - len(name))
    buf = mod._HEADER.pack(3, mod.IN_CREATE, 0, len(padded)) + padded
    buf += mod._HEADER.pack(-1, mod.IN_Q_OVERFLOW, 0, 0)
    got = list(parse_events(buf))
    assert got == [(3, mod.IN_CREATE, 0, os.fsdecode(name)), (-1, mod.IN_Q_OVERFLOW, 0, "")]
    assert os.fsencode(got[0][3]) == name
