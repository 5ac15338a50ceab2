"""Paths past PATH_MAX, on a real filesystem: named from a directory fd, stat'ed and opened."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.sensor import longpath


def _chain(top: Path, levels: int = 20) -> bytes:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    names = []
    try:
        for i in range(levels):
            names.append(b"%02d" % i + b"x" * 248)
            os.mkdir(names[-1], dir_fd=fd)
            nxt = os.open(names[-1], os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open(b"shell.php", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"<?php")
    finally:
        os.close(fd)
    return os.fsencode(top) + b"/" + b"/".join(names)


def test_a_directory_past_path_max_is_named_in_full(tmp_path: Path) -> None:
    deep = _chain(tmp_path)
    assert len(deep) > longpath.PATH_MAX
    with pytest.raises(OSError) as exc:
        os.lstat(deep)
    assert exc.value.errno == errno.ENAMETOOLONG  # what the kernel says to a plain path call
    parent, name = longpath._walk_down(deep + b"/shell.php")
    try:
        assert name == b"shell.php"
        fd = os.open(b".", os.O_PATH | os.O_DIRECTORY, dir_fd=parent)
        try:
            assert longpath.name_of_fd(fd) == deep
        finally:
            os.close(fd)
    finally:
        os.close(parent)
    assert longpath.lstat(deep + b"/shell.php").st_size == 5
    fd = longpath.open_file(deep + b"/shell.php", os.O_RDONLY)
    try:
        assert os.read(fd, 10) == b"<?php"
    finally:
        os.close(fd)


def test_a_short_path_is_named_as_readlink_names_it(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        assert longpath.name_of_fd(fd) == os.fsencode(tmp_path)
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        longpath.lstat(os.fsencode(tmp_path) + b"/" + b"y" * 250 + b"/" * 20 + b"z" * 4000)
