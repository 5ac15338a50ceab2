"""Mounts as the kernel lists them in mountinfo, and which filesystem types
are worth a mark."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Filesystems with no user files worth watching (and often refusing marks).
PSEUDO_FS = frozenset(
    {
        "proc",
        "sysfs",
        "cgroup",
        "cgroup2",
        "devpts",
        "mqueue",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "binfmt_misc",
        "autofs",
        "hugetlbfs",
        "nsfs",
        "efivarfs",
        "selinuxfs",
        "rpc_pipefs",
    }
)
# Remote filesystems: marked when they hold a watched path, but not for execs.
NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "afs", "9p", "fuse.sshfs"}
)


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    dev: int
    root: bytes
    mount_point: bytes
    fstype: str
    super_options: bytes = b""  # overlay: lowerdir=, upperdir=, workdir=


def parse_mountinfo(data: bytes) -> list[Mount]:
    """Mounts from mountinfo text; malformed lines are skipped."""
    mounts: list[Mount] = []
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            major, minor = fields[2].split(b":")
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    dev=os.makedev(int(major), int(minor)),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    fstype=fields[sep + 1].decode("ascii", "replace"),
                    super_options=_unescape(fields[sep + 3]) if len(fields) > sep + 3 else b"",
                )
            )
        except (ValueError, IndexError):
            continue
    return mounts


def mount_options(super_options: bytes) -> dict[bytes, bytes]:
    """``key=value`` options of a mount (an overlay's lowerdir=, upperdir=,
    workdir=); repeated lowerdir options (lowerdir+=) are joined with ":"."""
    out: dict[bytes, bytes] = {}
    for opt in super_options.split(b","):
        k, sep, v = opt.partition(b"=")
        if sep:
            out[k] = out[k] + b":" + v if k in out and k == b"lowerdir" else v
    return out


def _unescape(field: bytes) -> bytes:
    """Undo the kernel's octal escapes (\\040 for space, \\012 for newline...)."""
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == 0x5C and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)
