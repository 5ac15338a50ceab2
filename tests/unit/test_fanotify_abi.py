"""The fanotify buffer parser on synthetic buffers: exact fields, and no exception on junk."""

from __future__ import annotations

import os
import random

import pytest

from agent.sensor.sources.fanotify import abi
from agent.sensor.sources.fanotify.mounts import parse_mountinfo

FSID = (0x0D59E37E, 0xDBEE5DEF)
DIR_H = b"\x01\x02\x03\x04\x05\x06\x07\x08"
CHILD_H = b"\x11\x12\x13\x14\x15\x16\x17\x18"


def _create(name: bytes, pid: int = 4242, ondir: bool = False) -> bytes:
    info = abi.pack_fid(abi.FAN_EVENT_INFO_TYPE_DFID_NAME, FSID, 1, DIR_H, name)
    info += abi.pack_fid(abi.FAN_EVENT_INFO_TYPE_FID, FSID, 1, CHILD_H)
    mask = abi.FAN_CREATE | (abi.FAN_ONDIR if ondir else 0)
    return abi.pack_metadata(mask, abi.FAN_NOFD, pid, info)


def test_struct_sizes_match_the_uapi_header() -> None:
    assert abi.METADATA.size == 24
    assert abi.INFO_HEADER.size == 4
    assert abi.FSID.size == 8
    assert abi.FILE_HANDLE.size == 8


def test_create_event_gives_dir_handle_name_and_child_fid() -> None:
    res = abi.parse_buffer(_create(b"shell.php", ondir=True))
    assert res.error is None
    (ev,) = res.events
    assert ev.mask == abi.FAN_CREATE | abi.FAN_ONDIR
    assert (ev.pid, ev.fd) == (4242, abi.FAN_NOFD)
    dfid = ev.record(abi.FAN_EVENT_INFO_TYPE_DFID_NAME)
    assert dfid is not None
    assert (dfid.fsid, dfid.handle_type, dfid.handle, dfid.name) == (FSID, 1, DIR_H, b"shell.php")
    fid = ev.record(abi.FAN_EVENT_INFO_TYPE_FID)
    assert fid is not None
    assert (fid.handle, fid.name) == (CHILD_H, None)
    assert dfid.key == abi.FSID.pack(*FSID) + abi.FILE_HANDLE.pack(len(DIR_H), 1) + DIR_H


def test_rename_event_gives_old_and_new_names() -> None:
    info = abi.pack_fid(abi.FAN_EVENT_INFO_TYPE_OLD_DFID_NAME, FSID, 1, DIR_H, b"a.tmp")
    info += abi.pack_fid(abi.FAN_EVENT_INFO_TYPE_NEW_DFID_NAME, FSID, 1, DIR_H, b"a.php")
    info += abi.pack_fid(abi.FAN_EVENT_INFO_TYPE_FID, FSID, 1, CHILD_H)
    res = abi.parse_buffer(abi.pack_metadata(abi.FAN_RENAME, abi.FAN_NOFD, 7, info))
    (ev,) = res.events
    old = ev.record(abi.FAN_EVENT_INFO_TYPE_OLD_DFID_NAME)
    new = ev.record(abi.FAN_EVENT_INFO_TYPE_NEW_DFID_NAME)
    assert old is not None and new is not None
    assert (old.name, new.name) == (b"a.tmp", b"a.php")


def test_overflow_event_has_no_fd_and_no_records() -> None:
    res = abi.parse_buffer(abi.pack_metadata(abi.FAN_Q_OVERFLOW, abi.FAN_NOFD, 0))
    (ev,) = res.events
    assert ev.mask == abi.FAN_Q_OVERFLOW and ev.fd == abi.FAN_NOFD and ev.records == ()


def test_a_record_of_another_type_is_skipped_by_its_length() -> None:
    # A pidfd record (never requested: FAN_REPORT_PIDFD is off) before a fid record.
    pidfd = abi.INFO_HEADER.pack(abi.FAN_EVENT_INFO_TYPE_PIDFD, 0, abi.INFO_HEADER.size + 4) + b"\x09\0\0\0"
    info = pidfd + abi.pack_fid(abi.FAN_EVENT_INFO_TYPE_DFID_NAME, FSID, 1, DIR_H, b"x")
    (ev,) = abi.parse_buffer(abi.pack_metadata(abi.FAN_CREATE, -1, 1, info)).events
    assert [r.name for r in ev.records] == [b"x"]


def test_hostile_names_survive_as_exact_bytes() -> None:
    names = [b"caf\xe9\xff.php", b"new\nline", b"x" * 255, b"sp ace\t\x1b[31m"]
    buf = b"".join(_create(n) for n in names)
    res = abi.parse_buffer(buf)
    assert res.error is None
    got = [ev.record(abi.FAN_EVENT_INFO_TYPE_DFID_NAME).name for ev in res.events]  # type: ignore[union-attr]
    assert got == names


def test_many_events_in_one_buffer_keep_kernel_order() -> None:
    buf = b"".join(_create(b"f%d" % i, pid=i + 1) for i in range(500))
    res = abi.parse_buffer(buf)
    assert res.error is None
    assert [ev.pid for ev in res.events] == list(range(1, 501))


@pytest.mark.parametrize("cut", range(1, 60))
def test_truncated_buffer_stops_without_raising(cut: int) -> None:
    first = _create(b"one")
    buf = first + _create(b"two")
    res = abi.parse_buffer(buf[: len(first) + cut])
    assert len(res.events) == 1
    assert res.error is not None


def test_empty_buffer_is_no_events() -> None:
    assert abi.parse_buffer(b"") == abi.ParseResult([], None)


def test_wrong_metadata_version_stops() -> None:
    raw = bytearray(_create(b"a"))
    raw[4] = 2
    res = abi.parse_buffer(bytes(raw))
    assert res.events == [] and res.error is not None and "bad_version" in res.error


def test_event_len_shorter_than_metadata_stops() -> None:
    raw = abi.METADATA.pack(8, 3, 0, 24, abi.FAN_CREATE, -1, 1)
    res = abi.parse_buffer(raw)
    assert res.events == [] and res.error is not None and "bad_length" in res.error


def test_zero_length_info_record_does_not_loop() -> None:
    info = abi.INFO_HEADER.pack(abi.FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 0) + b"\0" * 12
    res = abi.parse_buffer(abi.pack_metadata(abi.FAN_CREATE, -1, 1, info))
    assert res.events == [] and res.error is not None and "bad_info_len" in res.error


def test_handle_longer_than_record_stops() -> None:
    info = bytearray(abi.pack_fid(abi.FAN_EVENT_INFO_TYPE_DFID_NAME, FSID, 1, DIR_H, b"n"))
    abi.FILE_HANDLE.pack_into(info, 12, 200, 1)
    res = abi.parse_buffer(abi.pack_metadata(abi.FAN_CREATE, -1, 1, bytes(info)))
    assert res.events == [] and res.error is not None and "bad_handle_len" in res.error


def test_a_short_fid_record_drops_its_event_and_says_why() -> None:
    info = abi.INFO_HEADER.pack(abi.FAN_EVENT_INFO_TYPE_FID, 0, 6) + b"\0\0"
    res = abi.parse_buffer(abi.pack_metadata(abi.FAN_CREATE, -1, 1, info))
    assert res.events == [] and res.error is not None and res.error.startswith("short_fid")


def test_name_without_nul_is_taken_to_record_end() -> None:
    body = abi.FSID.pack(*FSID) + abi.FILE_HANDLE.pack(len(DIR_H), 1) + DIR_H + b"abcd"
    info = abi.INFO_HEADER.pack(abi.FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 4 + len(body)) + body
    (ev,) = abi.parse_buffer(abi.pack_metadata(abi.FAN_CREATE, -1, 1, info)).events
    assert ev.records[0].name == b"abcd"


def test_unknown_info_type_is_skipped() -> None:
    info = abi.INFO_HEADER.pack(99, 0, 8) + b"\xaa" * 4
    info += abi.pack_fid(abi.FAN_EVENT_INFO_TYPE_DFID_NAME, FSID, 1, DIR_H, b"k")
    (ev,) = abi.parse_buffer(abi.pack_metadata(abi.FAN_CREATE, -1, 1, info)).events
    assert [r.name for r in ev.records] == [b"k"]


def test_random_junk_never_raises() -> None:
    rng = random.Random(1234)
    good = _create(b"seed") * 3
    for _ in range(3000):
        if rng.random() < 0.5:
            buf = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
        else:
            raw = bytearray(good)
            for _ in range(rng.randrange(1, 6)):
                raw[rng.randrange(len(raw))] = rng.getrandbits(8)
            buf = bytes(raw[: rng.randrange(len(raw) + 1)])
        res = abi.parse_buffer(buf)
        assert isinstance(res.events, list)


def test_fsid_from_statvfs_matches_kernel_words() -> None:
    assert abi.fsid_of_statvfs((0xDBEE5DEF << 32) | 0x0D59E37E) == FSID
    assert abi.fsid_of_statvfs(os.statvfs("/").f_fsid) == abi.fsid_of_statvfs(os.statvfs("/").f_fsid)


def test_mountinfo_parse_unescapes_and_skips_junk() -> None:
    text = (
        b"27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        b"90 27 0:50 /sub /srv/my\\040site\\012x rw shared:1 master:2 - tmpfs tmpfs rw\n"
        b"garbage line\n"
        b"22 27 0:21 / /proc rw - proc proc rw\n"
    )
    mounts = parse_mountinfo(text)
    assert [(m.mount_point, m.fstype, m.root) for m in mounts] == [
        (b"/", "ext4", b"/"),
        (b"/srv/my site\nx", "tmpfs", b"/sub"),
        (b"/proc", "proc", b"/"),
    ]
    assert mounts[1].dev == os.makedev(0, 50)
