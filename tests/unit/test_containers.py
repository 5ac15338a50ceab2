"""Containers read from a fake /proc: container ids by runtime, host paths
to container paths, users by the container's uid map and passwd; and the
resolver giving a container's event its paths, user and container."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.sensor.containers import Containers, container_of
from agent.sensor.resolver import Resolver
from agent.shared.clock import FakeClock
from agent.shared.events import CREATION, EXEC, RENAME, RawEvent

CID = "0123456789abcdef" * 4
BTIME = 1_700_000_000
HZ = os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize(
    ("cgroup", "runtime"),
    [
        (f"0::/system.slice/docker-{CID}.scope", "docker"),
        (f"8:pids:/docker/{CID}\n7:cpu:/docker/{CID}", "docker"),
        (
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-pod1.slice/cri-containerd-{CID}.scope",
            "containerd",
        ),
        (f"0::/kubepods/burstable/pod1/{CID}", "kubernetes"),
        (f"0::/kubepods.slice/kubepods-pod1.slice/crio-{CID}.scope", "cri-o"),
        (f"0::/machine.slice/libpod-{CID}.scope/container", "podman"),
    ],
)
def test_the_container_id_comes_from_the_cgroup_the_runtime_named(cgroup: str, runtime: str) -> None:
    info = container_of(cgroup.encode() + b"\n")
    assert info is not None and info.id == CID and info.runtime == runtime


def test_no_container_in_a_plain_cgroup() -> None:
    assert container_of(b"0::/user.slice/user-0.slice/session-1.scope\n") is None
    assert container_of(b"0::/system.slice/nginx.service\n") is None


def _proc(
    root: Path, pid: int, ns: str, mountinfo: str, cgroup: str, uid_map: str = "", rootfs: str = "/"
) -> None:
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    ns_file = root / "ns" / ns
    ns_file.parent.mkdir(exist_ok=True)
    if not ns_file.exists():
        ns_file.write_text(ns)
    os.link(ns_file, d / "ns" / "mnt")  # one inode per namespace, as nsfs gives
    (d / "mountinfo").write_text(mountinfo)
    (d / "cgroup").write_text(cgroup)
    (d / "uid_map").write_text(uid_map or "         0          0 4294967295\n")
    (d / "root").symlink_to(rootfs)
    ticks = 100 * HZ
    (d / "stat").write_text(f"{pid} (nginx) S 1 " + " ".join(["0"] * 17) + f" {ticks} 0 0\n")
    (d / "status").write_text(f"Name:\tnginx\nUid:\t100033\t100033\t100033\t100033\nNSpid:\t{pid}\t7\n")
    (d / "cmdline").write_bytes(b"nginx: worker process\0")
    (d / "exe").symlink_to("/var/lib/docker/overlay2/L1/merged/usr/sbin/nginx")


HOST_MOUNTS = (
    "22 1 254:0 / / rw - ext4 /dev/vda rw\n"
    "30 22 0:40 / /var/lib/docker/overlay2/L1/merged rw - overlay overlay "
    "rw,lowerdir=/var/lib/docker/overlay2/l/AAA:/var/lib/docker/overlay2/l/BBB,"
    "upperdir=/var/lib/docker/overlay2/L1/diff,workdir=/var/lib/docker/overlay2/L1/work\n"
)
CONTAINER_MOUNTS = (
    "600 500 0:40 / / rw - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/AAA:/var/lib/docker/overlay2/l/BBB,"
    "upperdir=/var/lib/docker/overlay2/L1/diff,workdir=/var/lib/docker/overlay2/L1/work\n"
    "601 600 0:50 / /proc rw - proc proc rw\n"
    "602 600 254:0 /srv/site/uploads /var/www/html/uploads rw - ext4 /dev/vda rw\n"
    "603 600 0:60 / /tmp rw - tmpfs tmpfs rw\n"
)


@pytest.fixture
def fake(tmp_path: Path) -> tuple[Containers, Path]:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    _proc(proc, 1, "host", HOST_MOUNTS, "0::/init.scope\n")
    os.link(proc / "ns" / "host", proc / "self" / "mnt")
    (proc / "self" / "ns").mkdir()
    os.link(proc / "ns" / "host", proc / "self" / "ns" / "mnt")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nwww-data:x:33:33::/var/www:/bin/sh\n")
    (proc / "stat").write_text(f"cpu 0\nbtime {BTIME}\n")
    _proc(proc, 4242, "ctr", CONTAINER_MOUNTS, f"0::/system.slice/docker-{CID}.scope\n",
          "         0     100000      65536\n", str(rootfs))  # fmt: skip
    c = Containers(proc_root=str(proc), is_dir=lambda path: True)  # its layers "exist"
    from agent.sensor.sources.fanotify.mounts import parse_mountinfo

    c.set_host_mounts(parse_mountinfo(HOST_MOUNTS.encode()))
    return c, proc


def test_host_paths_read_as_the_container_sees_them(fake: tuple[Containers, Path]) -> None:
    c, _ = fake
    v = c.view(c.ns_of(4242), 4242)
    assert v is not None and v.info is not None and v.info.id == CID
    assert (
        v.to_container(b"/var/lib/docker/overlay2/L1/diff/var/www/html/shell.php")
        == b"/var/www/html/shell.php"
    )
    assert v.to_container(b"/var/lib/docker/overlay2/l/BBB/usr/sbin/nginx") == b"/usr/sbin/nginx"  # a layer
    assert v.to_container(b"/srv/site/uploads/x.php") == b"/var/www/html/uploads/x.php"  # a bind mount
    assert v.to_container(b"/etc/passwd") is None  # the host's own
    assert v.is_work(b"/var/lib/docker/overlay2/L1/work/work/#64")
    assert [m.mount_point for m in v.own_mounts] == [b"/tmp"]  # only it has this tmpfs
    assert v.user(100033) == (33, "www-data") and v.user(5) == (None, None)  # unmapped: nobody's
    assert c.view(c.ns_of(1), 1) is None  # the host is no container


def test_a_containers_event_has_its_paths_user_and_container(fake: tuple[Containers, Path]) -> None:
    c, proc = fake
    r = Resolver(FakeClock(), proc_root=str(proc), containers=c)
    at = (BTIME + 200) * 1000
    r.resolve(RawEvent(kind=EXEC, ts_ms=at, path=b"/var/lib/docker/overlay2/l/AAA/usr/sbin/nginx", pid=4242))
    ev = r.resolve(
        RawEvent(
            kind=CREATION, ts_ms=at, path=b"/var/lib/docker/overlay2/L1/diff/var/www/html/s.php", pid=4242
        )
    )
    assert ev is not None
    assert ev.path == b"/var/www/html/s.php"
    assert ev.host_path == b"/var/lib/docker/overlay2/L1/diff/var/www/html/s.php"
    # one executable whichever form the kernel gave (exec record: a layer; /proc: the merged dir)
    assert ev.process.executable == b"/usr/sbin/nginx" and ev.attribution == "exact"
    assert ev.process.container is not None and ev.process.container.id == CID
    assert ev.process.vpid == 7
    assert (ev.user.id, ev.user.name) == ("33", "www-data")
    work = RawEvent(kind=RENAME, ts_ms=at, path=b"/var/lib/docker/overlay2/L1/diff/var",
                    pid=4242, original_path=b"/var/lib/docker/overlay2/L1/work/work/#3")  # fmt: skip
    assert r.resolve(work) is None and r.counters["overlay_work"] == 1


def test_a_gone_writers_event_is_placed_by_its_layer(fake: tuple[Containers, Path]) -> None:
    c, proc = fake
    r = Resolver(FakeClock(), proc_root=str(proc), containers=c)
    c.view(c.ns_of(4242), 4242)  # the container is known; its one-line writer (pid 999) is gone
    ev = r.resolve(
        RawEvent(kind=CREATION, ts_ms=1, path=b"/var/lib/docker/overlay2/L1/diff/var/www/html/x.php", pid=999)
    )
    assert ev is not None and ev.path == b"/var/www/html/x.php" and ev.process.pid == 999


def test_an_odd_passwd_is_read_as_far_as_it_makes_sense(tmp_path: Path) -> None:
    from agent.sensor.containers import _passwd

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("a:x:\u00b2:0::/:/bin/sh\nb:x:7:7::/:/bin/sh\nbroken\n")
    assert _passwd(str(tmp_path)) == {7: "b"}  # "²" is a digit to str.isdigit, not to int()
    (tmp_path / "etc" / "passwd").unlink()
    (tmp_path / "etc" / "passwd").symlink_to("/etc/passwd")  # would be the host's
    assert _passwd(str(tmp_path)) == {}
    (tmp_path / "etc" / "passwd").unlink()
    os.mkfifo(tmp_path / "etc" / "passwd")  # not a regular file: never read (nor blocked on)
    assert _passwd(str(tmp_path)) == {}


def test_a_containers_scope_adds_to_the_hosts_and_never_removes(tmp_path: Path) -> None:
    from agent.sensor.containers import View
    from agent.sensor.sources.fanotify.container_scope import ContainerScope
    from agent.sensor.sources.fanotify.source import FanotifySource

    c = Containers(proc_root=str(tmp_path))
    src = FanotifySource([b"/srv"], [b"/srv/cache"], containers=c)
    scope = src._cscope
    assert isinstance(scope, ContainerScope)
    # a "container" that shows the host's /srv/www as its excluded /run/user, and the host's / at /host
    v = View(ns=1, pid=1, root=b"/", info=None,
             routes=[(b"/srv/www", b"/run/user"), (b"/", b"/host"), (b"/var/lib/x/diff", b"/")])  # fmt: skip
    c._views[1] = v
    c.generation += 1
    scope._watch, scope._exclude = [b"/srv", b"/var/www"], [b"/srv/cache", b"/run/user"]
    assert scope.refresh()
    assert src._in_scope(b"/srv/www/shell.php")  # the host's watch holds: no container unwatches it
    assert not src._in_scope(b"/srv/cache/x")  # the host's exclude holds too
    assert src._in_scope(b"/var/lib/x/diff/var/www/html/s.php")  # the container's /var/www adds
    assert not src._in_scope(b"/var/lib/x/diff/etc/x")
    assert all(not p.startswith(b"/var/lib/x/diff/host") for p in scope.prefixes)
