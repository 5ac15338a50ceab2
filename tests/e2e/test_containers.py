"""Web servers in containers, made of kernel primitives (no daemon, no
registry): one image (a lower layer built from this host's binaries), two
replicas of it, each on its own host (an agent in its own mount namespace
with its own machine id), each replica an overlay with its own upper layer,
its own mount, pid and uts namespaces, a chroot, a cgroup named as docker
names its containers' and a tmpfs mounted only inside it; the second
replica in a user namespace (its www-data is host uid 100033).

One agent watches ``/``, the other ``/var/www/html`` and ``/data``:
container paths. What
must come out: rows in the container's paths with its ``container.id`` and
the host path kept beside; the tmpfs write seen; the remapped www-data
matched by name and id; no overlay work entry; the write both replicas make
is no row (agent_count 2), while the write only one makes is one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_live_agent import FAST, start_agent, wait_rows
from tests.support import procs
from tests.support.writers import www_tempdir

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlayfs, namespaces, fanotify"),
]
USERNS_BASE = 100000
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/sh\nnginx:x:101:101::/:/bin/sh\n"
)


def _image(root: str) -> None:
    """A lower layer from this host's binaries: dash as nginx and sh, sleep, libc, the loader."""
    for d in ("usr/sbin", "usr/bin", "lib/x86_64-linux-gnu", "lib64", "etc", "var/www/html", "data", "proc"):
        os.makedirs(f"{root}/{d}", exist_ok=True)
    shutil.copy("/bin/dash", f"{root}/usr/sbin/nginx")
    shutil.copy("/bin/dash", f"{root}/usr/bin/sh")
    shutil.copy("/usr/bin/sleep", f"{root}/usr/bin/sleep")
    for lib in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
        shutil.copy(os.path.realpath(lib), f"{root}{lib}")
    Path(f"{root}/etc/passwd").write_text(PASSWD)
    os.chown(f"{root}/var/www/html", 33, 33)


def _cgroup_parent() -> str:
    """A hierarchy to make a docker-named cgroup in (v1 pids, or v2)."""
    for d in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(f"{d}/cgroup.procs"):
            return d
    pytest.skip("no writable cgroup hierarchy")


@contextlib.contextmanager
def _cgroup(cid: str) -> Iterator[str]:
    path = f"{_cgroup_parent()}/docker/{cid}"
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(path)


USERNS_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    os.write(ready_w, b"x")
    os.read(go_r, 1)
    os.chroot(sys.argv[2])
    os.chdir("/")
    os.setgid(33)
    os.setuid(33)
    os.execv(sys.argv[3], sys.argv[3:])
os.read(ready_r, 1)
base, proc = sys.argv[1].split(":")  # the map's host base, the container's own /proc
for name, text in (("uid_map", f"0 {base} 65536"), ("setgroups", "deny"), ("gid_map", f"0 {base} 65536")):
    with open(f"{proc}/{pid}/{name}", "w") as f:
        f.write(text)
os.write(go_w, b"x")
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_container(
    agent_pid: int, image: str, store: str, cgroup: str, script: str, userns: str
) -> subprocess.CompletedProcess[bytes]:
    """One replica, started inside the agent's mount namespace (so on its
    tmpfs): overlay, its own tmpfs, proc, a hostname, then the shell
    ``script`` as www-data (uid 33 inside) under the name nginx; with
    ``userns`` (a helper script's path) in a user namespace whose 0 is host
    uid 100000."""
    # a user namespace's www-data needs its web root owned by its host uid; else the
    # first write copies the image's /var/www/html up (overlayfs's work entries)
    owner = USERNS_BASE + 33
    premade = (
        f"mkdir -p {store}/u/var/www/html; chown {owner}:{owner} {store}/u/var/www/html" if userns else ""
    )
    run_as = (
        f"{shutil.which('python3')} {userns} {USERNS_BASE}:{store}/m/proc"
        if userns
        else "chroot --userspec=33:33"
    )
    setup = f"""
set -e
echo $$ > {cgroup}/cgroup.procs
mkdir -p {store}/u {store}/w {store}/m
{premade}
mount -t overlay overlay -o lowerdir={image},upperdir={store}/u,workdir={store}/w {store}/m
mount -t tmpfs -o mode=1777 ct-data {store}/m/data
mount -t proc proc {store}/m/proc
hostname replica
exec {run_as} {store}/m /usr/sbin/nginx -c "$1"
"""
    argv = ["nsenter", "-t", str(agent_pid), "-m", "--", "unshare", "--mount", "--pid", "--uts", "--fork"]
    argv += ["--propagation", "private", "sh", "-c", setup, "sh", script]
    return subprocess.run(argv, capture_output=True, timeout=60, check=False)


def _namespaced(store: str, machine_id: str, image: str) -> list[str]:
    """The agent in a mount namespace of its own: its host's storage (a tmpfs),
    its machine id, and an overlay mounted in its namespace as docker mounts
    each container's merged root on the host (its superblock refuses marks:
    no gap, its writes are seen in the upper directory)."""
    merged = (
        f"mkdir {store}/hu {store}/hw {store}/merged && mount -t overlay overlay "
        f"-o lowerdir={image},upperdir={store}/hu,workdir={store}/hw {store}/merged"
    )
    script = (
        f"mount -t tmpfs -o mode=755 rw-store {store} && {merged} && "
        f'mount --bind {machine_id} /etc/machine-id && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def _alert_events(alerts: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    if alerts.exists():
        for line in alerts.read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            if doc["rarewrite"].get("events"):
                out.setdefault(doc["file"]["path"], []).extend(doc["rarewrite"]["events"])
    return out


def test_two_replicas_of_one_image_are_one_fleet_in_container_paths(tmp_path: Path) -> None:
    with www_tempdir("rw-e2e-ct-") as base:
        image, stores = f"{base}/image", [f"{base}/store0", f"{base}/store1"]
        _image(image)
        for store in stores:
            os.makedirs(store)
        userns = f"{base}/userns_exec.py"
        Path(userns).write_text(USERNS_EXEC)
        alerts = tmp_path / "alerts.ndjson"
        extra = ("--schedule", "continuous", "--settle", "1s", "--alerts-file", str(alerts))
        ids = [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(2)]
        agents, states = [], []
        with procs.collector(str(tmp_path), *extra) as c, _cgroup(ids[0]) as cg_a, _cgroup(ids[1]) as cg_b:
            try:
                for i in range(2):
                    home = tmp_path / f"host{i}"
                    home.mkdir()
                    (home / "machine-id").write_text(uuid.uuid4().hex + "\n")
                    # host 0 watches everything (overlay's own work entries come into view), host 1
                    # the container paths only
                    watch = ("/", ()) if i == 0 else ("/var/www/html", ("--watch", "/data"))
                    p, state, _ = start_agent(
                        home, c.url, watch[0], FAST, _namespaced(stores[i], str(home / "machine-id"), image),
                        (*watch[1], "--host-name", f"node-{i}"),
                    )  # fmt: skip
                    agents.append(p)
                    states.append(state)
                # a web server starts, then serves: the writes come after the agent saw it start
                both = "sleep 1; : > /var/www/html/shell.php"
                a = _run_container(agents[0].pid, image, stores[0], cg_a,
                                   both + "; : > /var/www/html/only-a.php; : > /data/cache.php; sleep 1", "")  # fmt: skip
                b = _run_container(agents[1].pid, image, stores[1], cg_b,
                                   both + "; : > /var/www/html/only-b.php; sleep 1", userns)  # fmt: skip
                assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
                nginx = "/usr/sbin/nginx"
                want = {
                    (nginx, "/var/www/html/only-a.php", 1),
                    (nginx, "/data/cache.php", 1),
                    (nginx, "/var/www/html/only-b.php", 1),
                }
                got = wait_rows(c.db, want)
                deadline = time.monotonic() + 15
                while (
                    not {w[1] for w in want} <= set(evs := _alert_events(alerts))
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.2)
                logs = [(tmp_path / f"host{i}" / "agent.log").read_text()[-3000:] for i in range(2)]
                refused = [json.loads((Path(st) / "status.json").read_text())["refused"] for st in states]
            finally:
                for p in agents:
                    procs.stop(p)
        assert got == want, logs  # shell.php: on both hosts, no row; no work dir, no layer path
        assert refused == [[], []], refused  # the overlay on the "host": not a gap
        only_a = evs["/var/www/html/only-a.php"][0]
        assert only_a["container.id"] == ids[0] and only_a["container.runtime"] == "docker", only_a
        assert only_a["rarewrite.file.host_path"] == f"{stores[0]}/u/var/www/html/only-a.php"
        assert only_a["user.name"] == "www-data" and only_a["process.name"] == "nginx"
        assert only_a["rarewrite.process.vpid"] != only_a["process.pid"]
        assert evs["/data/cache.php"][0]["container.id"] == ids[0]
        only_b = evs["/var/www/html/only-b.php"][0]
        assert only_b["container.id"] == ids[1]
        assert (only_b["user.name"], only_b["user.id"]) == ("www-data", "33"), only_b  # host uid 100033
