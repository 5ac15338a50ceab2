"""The same, with a real Docker engine (Debian's docker.io) where one can run:
an image imported from a local root filesystem (no registry), a container
writing as www-data; the row carries the container's path, its
container.id and the overlay's host path. Skips, with the reason, where
docker.io is not installed or its engine cannot start here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_containers import _alert_events, _image
from tests.e2e.test_live_agent import FAST, start_agent, wait_rows
from tests.support import procs

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: dockerd and fanotify"),
]
IMAGE = "rarewrite-e2e:1"


@pytest.fixture
def docker(tmp_path: Path) -> Iterator[list[str]]:
    """A private dockerd (own data root and socket); the docker command line for it."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("docker.io not installed (apt-get install docker.io)")
    root = Path(tempfile.mkdtemp(prefix="rw-dockerd-", dir="/var/tmp"))
    sock = f"unix://{root}/docker.sock"
    log = root / "dockerd.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [
                "dockerd",
                "--data-root",
                f"{root}/data",
                "--exec-root",
                f"{root}/exec",
                "--pidfile",
                f"{root}/docker.pid",
                "-H",
                sock,
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--storage-driver=overlay2",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cli = ["docker", "-H", sock]
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*cli, "info"], capture_output=True, check=False).returncode != 0:
            if p.poll() is not None or time.monotonic() > deadline:
                pytest.skip("the docker engine does not run here: " + log.read_text()[-400:])
            time.sleep(0.5)
        yield cli
    finally:
        procs.stop(p)
        shutil.rmtree(root, ignore_errors=True)


def test_a_docker_containers_write_is_named_as_the_container_sees_it(
    docker: list[str], tmp_path: Path
) -> None:
    rootfs = tmp_path / "rootfs"
    _image(str(rootfs))
    tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
    subprocess.run([*docker, "import", "-", IMAGE], input=tar.stdout, capture_output=True, check=True)
    cidfile = tmp_path / "cid"
    alerts = tmp_path / "alerts.ndjson"
    extra = ("--schedule", "continuous", "--settle", "1s", "--alerts-file", str(alerts))
    with procs.collector(str(tmp_path), *extra) as c:
        agent, _, _ = start_agent(tmp_path, c.url, "/var/www/html", FAST)
        try:
            run = subprocess.run(
                [
                    *docker,
                    "run",
                    "--rm",
                    "--network",
                    "none",
                    "--user",
                    "33:33",
                    "--cidfile",
                    str(cidfile),
                    IMAGE,
                    "/usr/sbin/nginx",
                    "-c",
                    "sleep 1; : > /var/www/html/docker-shell.php; sleep 1",
                ],
                capture_output=True,
                timeout=120,
                check=False,
            )
            assert run.returncode == 0, run.stderr
            want = {("/usr/sbin/nginx", "/var/www/html/docker-shell.php", 1)}
            got = wait_rows(c.db, want)
            deadline = time.monotonic() + 15
            while (
                "/var/www/html/docker-shell.php" not in (evs := _alert_events(alerts))
                and time.monotonic() < deadline
            ):
                time.sleep(0.2)
        finally:
            procs.stop(agent)
    assert got == want
    cid = cidfile.read_text().strip()
    status = json.loads((tmp_path / "agent" / "status.json").read_text())
    assert status["counters"]["writer_in_container"] >= 1, status["counters"]
    assert status["refused"] == []  # the merged overlay on the host: not a gap
    ev = evs["/var/www/html/docker-shell.php"][0]
    assert (ev["container.id"], ev["container.runtime"]) == (cid, "docker"), ev
    assert "/overlay2/" in ev["rarewrite.file.host_path"] and ev["user.name"] == "www-data", ev
