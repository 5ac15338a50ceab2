"""The Enricher: a detailed event's ``ctx`` from real parts (a web root, an
access log in tmp_path, the content scanner, a fake dpkg database), the
follow-up notes of what is logged after it, and the config it refuses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.sensor.enrich.accesslog import AccessLogs
from agent.sensor.enrich.content import ContentScanner
from agent.sensor.enrich.context import MAX_WATCHES, REQUESTS_PER_S, Enricher, build_enricher
from agent.sensor.enrich.packages import PackageIndex
from agent.sensor.enrich.webroots import WebRoot, WebRoots
from agent.sensor.outbox import Candidate
from agent.shared.clock import FakeClock
from agent.shared.config.schema import EnrichConfig
from agent.shared.errors import ConfigError

EXE = b"/usr/sbin/php-fpm8.2"


def stamp(ms: int) -> str:
    return time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(ms // 1000))


def line(ms: int, method: str, url: str, ua: str = "curl/8") -> str:
    return f'203.0.113.7 - - [{stamp(ms)}] "{method} {url} HTTP/1.1" 200 5 "-" "{ua}"\n'


class Site:
    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "www"
        (self.root / "uploads").mkdir(parents=True)
        self.log = tmp / "access.log"
        self.log.write_text("")
        dpkg = tmp / "dpkg"
        (dpkg / "info").mkdir(parents=True)
        self.packaged = tmp / "www" / "index.php"
        self.packaged.write_text("<?php echo 'hi';\n")
        (dpkg / "info" / "site.list").write_text(f"{self.packaged}\n")
        (dpkg / "status").write_text("Package: site\nStatus: install ok installed\n\n")
        root = WebRoot("nginx", bytes(self.root), "/", ("php",), ((str(self.log), "combined"),), ())
        self.now = (int(time.time()) - 60) * 1000  # whole seconds: the log's resolution
        self.clock = FakeClock(self.now)
        self.enricher = Enricher(
            EnrichConfig(request_window_ms=5000, followup_ms=60_000),
            self.clock,
            packages=PackageIndex(dpkg_dir=str(dpkg)),
            roots=WebRoots([root]),
            logs=AccessLogs([(str(self.log), "combined")], keep_s=1e6),
            content=ContentScanner(),
        )

    def write(self, name: str, data: bytes) -> Candidate:
        p = self.root / "uploads" / name
        p.write_bytes(data)
        self.enricher.arm()  # as the agent does when it stores a detailed event
        return Candidate(bytes(p), self.now, EXE, bytes(p), "php-fpm8.2")

    def logged(self, *lines: str) -> None:
        with self.log.open("a") as f:
            f.write("".join(lines))


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_a_shell_gets_its_package_web_root_content_and_the_request_that_wrote_it(site: Site) -> None:
    cand = site.write("s.php", b"<?php system($_GET['c']);")
    site.logged(
        line(site.now - 3000, "GET", "/index.php"),
        line(site.now + 1000, "GET", "/style.css"),
        line(site.now + 2000, "POST", "/upload.php", "uploader"),
        line(site.now + 60_000, "POST", "/too-late.php"),
    )
    ctx = site.enricher(cand)
    assert ctx is not None
    assert ctx["pkg"] == {"own": False}
    assert ctx["root"] == {
        "in": True,
        "srv": "nginx",
        "dir": bytes(site.root),
        "url": "/uploads/s.php",
        "exec": True,
    }
    assert {"exec_call", "request_to_exec"} <= set(ctx["sig"])
    # the upload first (a method that writes), then the nearest; nothing outside the window
    assert [(r["m"], r["url"]) for r in ctx["req"]] == [
        ("POST", "/upload.php"),
        ("GET", "/style.css"),
        ("GET", "/index.php"),
    ]
    assert all(r["w"] for r in ctx["req"]) and ctx["req"][0]["ua"] == "uploader"


def test_a_packaged_file_is_owned_and_a_file_outside_the_roots_is_not_inside(
    site: Site, tmp_path: Path
) -> None:
    ctx = site.enricher(Candidate(bytes(site.packaged), site.now, EXE, bytes(site.packaged), "php-fpm8.2"))
    assert ctx is not None and ctx["pkg"] == {
        "own": True,
        "mgr": "dpkg",
        "name": "site",
    }  # no md5sums: unknown
    other = tmp_path / "elsewhere.txt"
    other.write_text("x")
    ctx = site.enricher(Candidate(bytes(other), site.now, EXE, bytes(other), "php-fpm8.2"))
    assert ctx is not None and ctx["root"] == {"in": False}


def test_a_containers_file_is_judged_by_its_content_only(site: Site) -> None:
    cand = site.write("c.php", b"<?php eval(base64_decode($_POST['x']));")
    ctx = site.enricher(cand._replace(path=b"/var/www/html/c.php"))
    assert ctx is not None and set(ctx) == {"sig", "req"} and "eval_chain" in ctx["sig"]


def test_requests_for_the_new_file_and_late_lines_come_as_notes_once(site: Site) -> None:
    cand = site.write("s.php", b"<?php echo 1;")
    site.logged(line(site.now + 500, "POST", "/upload.php"))
    site.enricher(cand)
    assert site.enricher.poll() == []  # nothing new
    site.logged(
        line(site.now + 4000, "PUT", "/late.php"),  # in the write's window, logged after the event went
        line(site.now + 30_000, "GET", "/uploads/s.php?c=id"),  # the shell called
        line(site.now + 31_000, "GET", "/uploads//./s.php/extra"),  # not the same URL path
        line(site.now + 32_000, "GET", "/uploads/other.php"),
    )
    site.clock.advance(6)
    [note] = site.enricher.poll()
    assert (note["ts"], note["exe"], note["path"], note["kind"]) == (cand.ts_ms, EXE, cand.path, "req")
    assert [(r["url"], r["w"]) for r in note["reqs"]] == [("/late.php", True), ("/uploads/s.php?c=id", False)]
    assert site.enricher.poll() == []  # each request once
    site.clock.advance(60)  # past followup: no longer watched
    site.logged(line(site.now + 70_000, "GET", "/uploads/s.php"))
    assert site.enricher.poll() == []
    assert site.enricher.status()["watches"] == 0


def test_watches_and_the_requests_looked_up_a_second_are_bounded(site: Site) -> None:
    def new_file(i: int) -> Candidate:
        return Candidate(b"%s/uploads/f%d.php" % (bytes(site.root), i), site.now, EXE, None, None)

    for i in range(REQUESTS_PER_S + 5):  # a burst of new files in one second (sessions, say)
        site.enricher(new_file(i))
    assert site.enricher.counters["requests_skipped"] == 5
    for i in range(MAX_WATCHES + 10):
        if i % REQUESTS_PER_S == 0:
            site.clock.advance(1)
        site.enricher(new_file(i))
    assert site.enricher.status()["watches"] == MAX_WATCHES
    assert site.enricher.counters["watches_dropped"] == REQUESTS_PER_S + 10


def test_every_unusable_web_root_and_log_format_is_listed_at_start(tmp_path: Path) -> None:
    cfg = EnrichConfig(
        web_roots=("relative:php", "/srv/ok:php"),
        server_configs=(str(tmp_path / "nginx.conf"),),
        access_logs=((str(tmp_path / "a.log"), "$remote_addr only"), (str(tmp_path / "b.log"), "combined")),
    )
    with pytest.raises(ConfigError) as got:
        build_enricher(cfg, FakeClock(0))
    text = "\n".join(got.value.problems)
    assert "relative:php" in text and "a.log" in text and "b.log" not in text
    assert build_enricher(EnrichConfig(enabled=False), FakeClock(0)) is None


def test_a_file_name_that_is_not_utf8_gives_a_context_the_wire_takes(site: Site) -> None:
    import msgpack

    from agent.shared.wire.context import context_map

    name = b"\xff\xfe.php"
    p = bytes(site.root) + b"/uploads/" + name
    with open(p, "wb") as f:
        f.write(b"<?php system($_GET['c']);")
    ctx = site.enricher(Candidate(p, site.now, EXE, p, "php-fpm8.2"))
    assert ctx is not None and ctx["root"]["url"] == "/uploads/\\xff\\xfe.php"
    assert context_map(msgpack.unpackb(msgpack.packb(ctx, use_bin_type=True), raw=False), "ctx") == ctx


def test_unarmed_only_lines_naming_a_watched_file_are_parsed(site: Site) -> None:
    cand = site.write("s.php", b"<?php echo 1;")
    site.logged(line(site.now + 500, "POST", "/upload.php"))
    site.enricher(cand)
    site.clock.advance(30)  # the write's window is long past: disarmed, the new file still watched
    site.logged(*(line(site.now + 40_000 + i, "GET", f"/page{i}.php") for i in range(50)),
                line(site.now + 41_000, "GET", "/uploads/s.php?c=id"))  # fmt: skip
    [note] = site.enricher.poll()
    assert [r["url"] for r in note["reqs"]] == ["/uploads/s.php?c=id"]
    assert site.enricher.logs is not None and site.enricher.logs.counters["filtered"] == 50
    site.clock.advance(600)  # nothing watched any more: nothing parsed
    site.enricher.poll()
    site.logged(line(site.now + 700_000, "GET", "/uploads/s.php"))
    assert site.enricher.poll() == [] and site.enricher.logs.counters["filtered"] == 51
