"""The resolver: real /proc for this process, a fake proc root for gone and odd processes."""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

import psutil
import pytest

from agent.sensor.resolver import EXEC_WAIT_S, Resolver
from agent.shared.clock import FakeClock
from agent.shared.events import (
    CACHED,
    CREATION,
    EXACT,
    EXEC,
    INFERRED,
    OVERFLOW,
    RENAME,
    UNCERTAIN,
    UNKNOWN,
    RawEvent,
)

BTIME = 1_700_000_000
HZ = os.sysconf("SC_CLK_TCK")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _fake_proc(
    root: Path,
    pid: int,
    comm: str,
    exe: str,
    *,
    euid: int = 33,
    ppid: int = 1,
    start_s: float = 100.0,
    cmdline: bytes = b"",
    state: str = "S",
) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    ticks = int(start_s * HZ)
    fields = [state, str(ppid)] + ["0"] * 17 + [str(ticks)] + ["0"] * 10
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    (d / "status").write_text(f"Name:\t{comm}\nUid:\t{euid + 1}\t{euid}\t{euid}\t{euid}\nGid:\t0\t0\t0\t0\n")
    (d / "cmdline").write_bytes(cmdline)
    (d / "exe").symlink_to(exe)


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    (root / "stat").write_text(f"cpu 0 0 0\nbtime {BTIME}\n")
    return root


def test_own_process_is_exact_from_real_proc(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"x")
    r = Resolver(FakeClock())
    ev = r.resolve(RawEvent(kind=CREATION, ts_ms=_now_ms(), path=bytes(target), pid=os.getpid()))
    assert ev is not None
    me = psutil.Process()
    assert ev.attribution == EXACT
    assert ev.process.pid == os.getpid()
    assert ev.process.name == me.name()
    assert ev.process.executable == os.fsencode(me.exe())
    assert ev.process.ppid == os.getppid()
    assert ev.process.command_line == " ".join(me.cmdline())
    assert ev.process.start_time == pytest.approx(me.create_time(), abs=1.0)
    assert ev.process.parent_name == me.parent().name()  # type: ignore[union-attr]
    assert ev.user.id == str(os.geteuid())
    assert ev.user.name == pwd.getpwuid(os.geteuid()).pw_name
    assert ev.event_type == ("creation",) and ev.os_type == "linux" and ev.path == bytes(target)


def test_cache_hit_is_fast() -> None:
    r = Resolver(FakeClock())
    raw = RawEvent(kind=RENAME, ts_ms=_now_ms(), path=b"/nonexistent/x", pid=os.getpid(), original_path=b"/a")
    first = r.resolve(raw)
    assert first is not None and first.original_path == b"/a" and first.event_type == ("change",)
    n = 3000
    t0 = time.perf_counter()
    for _ in range(n):
        r.resolve(raw)
    per_call_us = (time.perf_counter() - t0) / n * 1e6
    print(f"resolver cache hit: {per_call_us:.1f} us")
    assert r.counters["exact"] == n + 1
    assert per_call_us < 200  # target well under 50 us; loose bound for slow CI


def test_exec_and_overflow_records_give_no_event(proc_root: Path) -> None:
    r = Resolver(FakeClock(), proc_root=str(proc_root))
    assert r.resolve(RawEvent(kind=EXEC, ts_ms=1, path=b"/usr/bin/true", pid=5)) is None
    assert r.resolve(RawEvent(kind=OVERFLOW, ts_ms=1, path=None, lost=1)) is None


def test_gone_writer_uses_exec_record_and_file_owner(proc_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "dropped.php"
    target.write_bytes(b"<?php")
    os.chown(target, 33, 33) if os.geteuid() == 0 else None
    r = Resolver(FakeClock(), proc_root=str(proc_root))
    exe = b"/srv/bin/a-very-long-server-name"
    r.resolve(RawEvent(kind=EXEC, ts_ms=1, path=exe, pid=4321))
    r.resolve(RawEvent(kind=EXEC, ts_ms=1, path=b"/lib64/ld-linux-x86-64.so.2", pid=4321))
    ev = r.resolve(RawEvent(kind=CREATION, ts_ms=2, path=os.fsencode(target), pid=4321))
    assert ev is not None
    assert ev.attribution == CACHED
    assert ev.process.pid == 4321
    assert ev.process.executable == exe  # the loader exec did not replace it
    assert ev.process.name == "a-very-long-ser"  # 15 bytes, like comm
    assert ev.user.id == str(target.stat().st_uid)


def test_exec_read_at_exec_time_survives_exit(proc_root: Path) -> None:
    _fake_proc(proc_root, 77, "php-fpm8.2", "/usr/bin/python3.11", euid=33, cmdline=b"php-fpm8.2\0-c\0x\0")
    _fake_proc(proc_root, 1, "systemd", "/usr/lib/systemd/systemd", euid=0)
    r = Resolver(FakeClock(), proc_root=str(proc_root))
    r.resolve(RawEvent(kind=EXEC, ts_ms=1, path=b"/usr/bin/python3.11", pid=77))
    for f in (proc_root / "77").iterdir():
        f.unlink()
    (proc_root / "77").rmdir()
    ev = r.resolve(RawEvent(kind=RENAME, ts_ms=2, path=b"/nonexistent", pid=77))
    assert ev is not None
    assert ev.attribution == CACHED
    assert ev.process.name == "php-fpm8.2"
    assert ev.process.command_line == "php-fpm8.2 -c x"
    assert ev.process.parent_name == "systemd"
    assert ev.user.id == "33"  # the effective uid, not the real one (34)
    assert ev.process.start_time == pytest.approx(BTIME + 100.0)


def test_unknown_pid_keeps_event_with_pid_only(proc_root: Path) -> None:
    r = Resolver(FakeClock(), proc_root=str(proc_root))
    ev = r.resolve(RawEvent(kind=RENAME, ts_ms=1, path=b"/nonexistent/y", pid=999))
    assert ev is not None
    assert ev.attribution == UNKNOWN
    assert ev.process.pid == 999 and ev.process.name is None and ev.process.executable is None
    assert ev.user.id is None


def test_pid_reused_after_event_is_not_exact(proc_root: Path) -> None:
    _fake_proc(proc_root, 50, "bash", "/usr/bin/bash", start_s=5000.0)
    r = Resolver(FakeClock(), proc_root=str(proc_root))
    event_ms = (BTIME + 100) * 1000  # long before pid 50 started
    ev = r.resolve(RawEvent(kind=RENAME, ts_ms=event_ms, path=b"/x", pid=50))
    assert ev is not None and ev.attribution == UNKNOWN and ev.process.name is None
    assert r.counters["pid_reused"] == 1


def test_truncated_comm_is_extended_from_cmdline_and_deleted_suffix_stripped(proc_root: Path) -> None:
    _fake_proc(
        proc_root,
        60,
        "gunicorn-worker",
        "/opt/app/gunicorn-worker-x (deleted)",
        cmdline=b"gunicorn-worker-x\0",
    )
    r = Resolver(FakeClock(), proc_root=str(proc_root))
    ev = r.resolve(RawEvent(kind=RENAME, ts_ms=(BTIME + 200) * 1000, path=b"/x", pid=60))
    assert ev is not None and ev.attribution == EXACT
    assert ev.process.name == "gunicorn-worker-x"
    assert ev.process.executable == b"/opt/app/gunicorn-worker-x"


def test_a_write_before_an_exec_keeps_the_writers_identity(proc_root: Path) -> None:
    _fake_proc(proc_root, 61, "nginx", "/usr/sbin/nginx", cmdline=b"nginx\0")
    clock = FakeClock()
    r = Resolver(clock, proc_root=str(proc_root))
    raw = RawEvent(kind=RENAME, ts_ms=clock.now_ms(), path=b"/x", pid=61)
    assert r.resolve(raw).process.name == "nginx"  # type: ignore[union-attr]
    (proc_root / "61" / "exe").unlink()
    _fake_proc(proc_root, 61, "sleep", "/usr/bin/sleep", cmdline=b"sleep\0")  # exec'd: same pid, start
    clock.advance(1.0)
    # no exec record before this event in the queue: it was written before the exec
    ev = r.resolve(raw)
    assert ev is not None and ev.process.name == "nginx" and ev.process.executable == b"/usr/sbin/nginx"
    assert ev.attribution == CACHED
    r.resolve(RawEvent(kind=EXEC, ts_ms=clock.now_ms(), path=b"/usr/bin/sleep", pid=61))
    after = r.resolve(raw)  # behind the exec record: the new image
    assert after is not None and after.process.name == "sleep" and after.attribution == EXACT


def test_an_exec_whose_record_never_comes_is_believed_later_as_uncertain(proc_root: Path) -> None:
    _fake_proc(proc_root, 62, "nginx", "/usr/sbin/nginx", cmdline=b"nginx\0")
    clock = FakeClock()
    r = Resolver(clock, proc_root=str(proc_root))
    raw = RawEvent(kind=RENAME, ts_ms=clock.now_ms(), path=b"/x", pid=62)
    r.resolve(raw)
    (proc_root / "62" / "exe").unlink()
    _fake_proc(proc_root, 62, "memfd:x", "/memfd:x (deleted)", cmdline=b"x\0")  # fexecve of a memfd
    clock.advance(1.0)
    assert r.resolve(raw).process.name == "nginx"  # type: ignore[union-attr]
    clock.advance(EXEC_WAIT_S)
    late = r.resolve(raw)
    assert late is not None and late.process.name == "memfd:x" and late.attribution == UNCERTAIN


def test_a_process_that_renames_itself_is_judged_by_its_old_name_until_then(proc_root: Path) -> None:
    _fake_proc(proc_root, 63, "node", "/usr/bin/node", cmdline=b"node\0app.js\0")
    clock = FakeClock()
    r = Resolver(clock, proc_root=str(proc_root))
    assert r.resolve(RawEvent(kind=RENAME, ts_ms=clock.now_ms(), path=b"/a", pid=63)).process.name == "node"  # type: ignore[union-attr]
    written = clock.now_ms() + 10
    (proc_root / "63" / "exe").unlink()
    _fake_proc(proc_root, 63, "innocent", "/usr/bin/node", cmdline=b"node\0app.js\0")  # prctl(PR_SET_NAME)
    clock.advance(1.0)
    ev = r.resolve(RawEvent(kind=RENAME, ts_ms=written, path=b"/b", pid=63))
    assert ev is not None and ev.process.name == "node" and ev.attribution == UNCERTAIN
    again = r.resolve(RawEvent(kind=RENAME, ts_ms=written + 1, path=b"/c", pid=63))  # read before we knew
    assert again is not None and again.process.name == "node" and again.attribution == UNCERTAIN
    clock.advance(1.0)
    later = r.resolve(RawEvent(kind=RENAME, ts_ms=clock.now_ms(), path=b"/d", pid=63))
    assert later is not None and later.process.name == "innocent" and later.attribution == EXACT
    assert r.trusted(63) is None  # never prefiltered: either name may be the one


def test_a_rename_before_its_exec_record_is_read_keeps_the_exec_name(proc_root: Path) -> None:
    _fake_proc(
        proc_root, 64, "innocent", "/usr/bin/python3.11", cmdline=b"/usr/bin/python3\0/srv/bin/nginx\0"
    )
    clock = FakeClock()
    r = Resolver(clock, proc_root=str(proc_root))
    written = clock.now_ms()
    r.resolve(RawEvent(kind=EXEC, ts_ms=written, path=b"/srv/bin/nginx", pid=64))  # the script
    r.resolve(RawEvent(kind=EXEC, ts_ms=written, path=b"/usr/bin/python3.11", pid=64))  # its interpreter
    ev = r.resolve(RawEvent(kind=CREATION, ts_ms=written, path=b"/nonexistent/f", pid=64))
    assert ev is not None and ev.process.name == "nginx" and ev.attribution == UNCERTAIN
    assert ev.process.executable == b"/usr/bin/python3.11"


def test_a_rename_before_a_symlinked_exec_is_read_keeps_argv0s_name(proc_root: Path) -> None:
    _fake_proc(proc_root, 66, "innocent", "/usr/bin/python3.11", cmdline=b"/srv/bin/php-fpm8.2\0-c\0x\0")
    clock = FakeClock()
    r = Resolver(clock, proc_root=str(proc_root))
    r.resolve(RawEvent(kind=EXEC, ts_ms=clock.now_ms(), path=b"/usr/bin/python3.11", pid=66))
    ev = r.resolve(RawEvent(kind=RENAME, ts_ms=clock.now_ms(), path=b"/x", pid=66))
    assert ev is not None and ev.process.name == "php-fpm8.2" and ev.attribution == UNCERTAIN


def test_a_script_named_after_a_server_is_not_taken_for_a_rename(proc_root: Path) -> None:
    _fake_proc(proc_root, 65, "nginx", "/usr/bin/python3.11", cmdline=b"/usr/bin/python3\0/srv/bin/nginx\0")
    r = Resolver(FakeClock(), proc_root=str(proc_root))
    at = (BTIME + 200) * 1000
    r.resolve(RawEvent(kind=EXEC, ts_ms=at, path=b"/usr/bin/python3.11", pid=65))
    ev = r.resolve(RawEvent(kind=CREATION, ts_ms=at, path=b"/nonexistent/f", pid=65))
    assert ev is not None and ev.process.name == "nginx" and ev.attribution == EXACT


def test_cache_is_bounded(proc_root: Path) -> None:
    r = Resolver(FakeClock(), exec_cache_size=3, proc_root=str(proc_root))
    for pid in range(100, 110):
        r.resolve(RawEvent(kind=EXEC, ts_ms=1, path=b"/bin/p%d" % pid, pid=pid))
    assert r.resolve(RawEvent(kind=RENAME, ts_ms=2, path=b"/x", pid=100)).attribution == UNKNOWN  # type: ignore[union-attr]
    assert r.resolve(RawEvent(kind=RENAME, ts_ms=2, path=b"/x", pid=109)).attribution == CACHED  # type: ignore[union-attr]


def test_no_pid_is_inferred_from_owner_and_web_process(tmp_path: Path) -> None:
    target = tmp_path / "g"
    target.write_bytes(b"")
    me = psutil.Process()
    r = Resolver(FakeClock(), is_web_process=lambda name: name == me.name())
    ev = r.resolve(RawEvent(kind=CREATION, ts_ms=_now_ms(), path=bytes(target), pid=None))
    assert ev is not None
    assert ev.user.id == str(os.geteuid())
    assert ev.attribution == INFERRED
    assert ev.process.name == me.name()
    no_rule = Resolver(FakeClock()).resolve(RawEvent(kind=CREATION, ts_ms=1, path=bytes(target)))
    assert no_rule is not None and no_rule.attribution == UNKNOWN and no_rule.user.id == str(os.geteuid())


def test_a_server_that_drops_root_after_it_was_cached_is_seen_as_its_new_user(proc_root: Path) -> None:
    _fake_proc(proc_root, 71, "lighttpd", "/usr/sbin/lighttpd", euid=0, cmdline=b"lighttpd\0-D\0")
    clock = FakeClock()
    r = Resolver(clock, proc_root=str(proc_root))
    raw = RawEvent(kind=RENAME, ts_ms=clock.now_ms(), path=b"/x", pid=71)
    assert r.resolve(raw).user.id == "0"  # type: ignore[union-attr]
    (proc_root / "71" / "exe").unlink()
    _fake_proc(
        proc_root, 71, "lighttpd", "/usr/sbin/lighttpd", euid=33, cmdline=b"lighttpd\0-D\0"
    )  # setuid(33)
    clock.advance(1.0)  # past the trust window
    read_before = r.resolve(raw)  # a rename says nothing of its user: which one wrote it is not known
    assert read_before is not None and read_before.user.id == "0" and read_before.attribution == UNCERTAIN
    clock.advance(1.0)
    ev = r.resolve(RawEvent(kind=RENAME, ts_ms=clock.now_ms(), path=b"/x", pid=71))
    assert ev is not None and ev.user.id == "33" and ev.user.name == "www-data" and ev.attribution == EXACT


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files owned by another user)")
def test_a_creation_is_the_users_who_wrote_it_not_its_owners_now(proc_root: Path, tmp_path: Path) -> None:
    _fake_proc(proc_root, 72, "nginx", "/usr/sbin/nginx", euid=0, cmdline=b"nginx\0")
    clock = FakeClock()
    r = Resolver(clock, proc_root=str(proc_root))
    r.resolve(RawEvent(kind=EXEC, ts_ms=clock.now_ms(), path=b"/usr/sbin/nginx", pid=72))
    # the master creates its temp dir as root and chowns it to www-data at once
    body = tmp_path / "body"
    body.mkdir()
    os.chown(body, 33, 33)
    ev = r.resolve(RawEvent(kind=CREATION, ts_ms=clock.now_ms(), path=os.fsencode(body), pid=72))
    assert ev is not None and ev.user.id == "0" and ev.attribution == EXACT
    # lighttpd-like: created as root, then the process dropped to www-data before we read it
    pid_file = tmp_path / "server.pid"
    pid_file.write_text("72\n")
    written = clock.now_ms()
    (proc_root / "72" / "exe").unlink()
    _fake_proc(proc_root, 72, "nginx", "/usr/sbin/nginx", euid=33, cmdline=b"nginx\0")
    clock.advance(1.0)
    dropped = r.resolve(RawEvent(kind=CREATION, ts_ms=written, path=os.fsencode(pid_file), pid=72))
    assert dropped is not None and dropped.user.id == "0" and dropped.attribution == UNCERTAIN


def test_a_writer_outside_the_agents_pid_namespace_keeps_its_event(proc_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "shell.php"
    target.write_bytes(b"<?php")
    r = Resolver(FakeClock(), proc_root=str(proc_root))
    ev = r.resolve(RawEvent(kind=CREATION, ts_ms=1, path=os.fsencode(target), pid=0))
    assert ev is not None and ev.attribution == UNKNOWN and ev.process.pid is None
    assert ev.user.id == str(os.geteuid())
    assert r.counters["outside_pid_namespace"] == 1
    assert r.resolve(RawEvent(kind=EXEC, ts_ms=1, path=b"/usr/bin/true", pid=0)) is None


def test_an_exec_seen_through_another_mount_is_the_same_binary(proc_root: Path, tmp_path: Path) -> None:
    binary = tmp_path / "srv-bin-nginx"
    binary.write_bytes(b"\x7fELF")
    other = tmp_path / "data-bin-nginx"
    os.link(binary, other)  # one inode, two names: as a bind mount shows it
    _fake_proc(proc_root, 80, "nginx", str(binary), cmdline=b"nginx\0")
    clock = FakeClock()
    r = Resolver(clock, proc_root=str(proc_root))
    r.resolve(RawEvent(kind=EXEC, ts_ms=clock.now_ms(), path=os.fsencode(other), pid=80))
    clock.advance(1.0)
    ev = r.resolve(RawEvent(kind=RENAME, ts_ms=(BTIME + 200) * 1000, path=b"/x", pid=80))
    assert ev is not None and ev.attribution == EXACT and ev.process.command_line == "nginx"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a file owned by www-data)")
def test_a_gone_writers_rename_is_its_files_owners(proc_root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "upload.php"
    moved.write_bytes(b"<?php")
    os.chown(moved, 33, 33)
    r = Resolver(FakeClock(), proc_root=str(proc_root))
    r.resolve(RawEvent(kind=EXEC, ts_ms=1, path=b"/usr/bin/python3.11", pid=4400))  # gone already: no /proc
    ev = r.resolve(
        RawEvent(kind=RENAME, ts_ms=2, path=os.fsencode(moved), pid=4400, original_path=b"/t/up.tmp")
    )
    assert ev is not None and ev.attribution == CACHED and ev.user.id == "33"
