"""Which server configs the agent reads: the running servers' own (from a
fake /proc), only from processes of root; the roots and logs found, the
admin's entries and formats checked; the enricher taking up a site started
after it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.sensor.enrich import servers
from agent.sensor.enrich.context import Enricher
from agent.sensor.enrich.webroots import WebRoot, WebRoots
from agent.shared.clock import FakeClock
from agent.shared.config.schema import EnrichConfig


def fake_proc(tmp: Path, procs: dict[int, tuple[str, bytes, int]]) -> str:
    root = tmp / "proc"
    for pid, (comm, cmdline, uid) in procs.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes(cmdline)
        (d / "ns").mkdir()
        os.symlink(os.readlink("/proc/self/ns/mnt"), d / "ns" / "mnt")
        os.symlink("/bin/sh", d / "exe")  # a root-owned binary
        os.chown(d, uid, uid)
    (root / "self" / "ns").mkdir(parents=True)
    os.symlink(os.readlink("/proc/self/ns/mnt"), root / "self" / "ns" / "mnt")
    return str(root)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the fake /proc entries their owners")
def test_running_servers_name_their_configs_and_only_roots_count(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {
        10: ("nginx", b"nginx: master process /usr/sbin/nginx -c /srv/site/nginx.conf", 0),
        11: ("nginx", b"nginx: worker process", 33),
        12: ("nginx", b"/usr/sbin/nginx\0-c\0/etc/shadow\0", 33),  # a user's "nginx": never followed
        13: ("apache2", b"/usr/sbin/apache2\0-d\0/opt/ap\0-f\0conf/httpd.conf\0", 0),
        14: ("httpd", b"/usr/sbin/httpd\0-DFOREGROUND\0", 0),  # no -f: the configured paths cover it
        15: ("nginx", b"nginx -p /opt/n/ -c conf/nginx.conf", 0),
        16: ("bash", b"nginx -c /x", 0),
        17: ("nginx", b"nginx -c /in/a/container.conf", 0),  # root, but in another mount namespace
    })  # fmt: skip
    os.unlink(f"{proc}/17/ns/mnt")
    os.symlink("mnt:[1]", f"{proc}/17/ns/mnt")
    assert servers.running_configs(proc) == [
        "/srv/site/nginx.conf",
        "/opt/ap/conf/httpd.conf",
        "/opt/n/conf/nginx.conf",
    ]


def test_roots_and_logs_from_a_config_and_the_admins_entries(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        "http { log_format odd '$remote_addr %%weird%%'; access_log /srv/a.log odd;"
        " server { root /srv/www; location ~ \\.php$ { fastcgi_pass unix:/x.sock; } } }"
    )
    problems: list[str] = []
    cfg = EnrichConfig(web_roots=("auto", "/srv/extra:php"), server_configs=(str(conf),),
                       access_logs=(("auto", ""), ("/srv/b.log", "combined")))  # fmt: skip
    roots = servers.web_roots(cfg, problems)
    assert [r.root for r in roots] == [b"/srv/www", b"/srv/extra"] and roots[0].executable == ("php",)
    # the server's own format we cannot read costs that log only; the admin's are checked
    assert servers.access_logs(cfg, roots, problems) == [("/srv/b.log", "combined")]
    assert problems == []
    bad = EnrichConfig(access_logs=(("/srv/c.log", "$remote_addr only"),))
    servers.access_logs(bad, [], problems)
    assert len(problems) == 1 and "/srv/c.log" in problems[0]


def test_a_site_started_after_the_agent_is_taken_up(tmp_path: Path) -> None:
    clock = FakeClock()
    enricher = Enricher(EnrichConfig(), clock, roots=WebRoots([]))
    log = tmp_path / "access.log"
    log.write_text("")
    root = WebRoot("nginx", b"/srv/late", "/", ("php",), ((str(log), "combined"),), ())
    enricher.rediscover = lambda: ([root], [(str(log), "combined")])
    enricher.poll()
    assert enricher.logs is None  # not yet: once every 30 s
    clock.advance(31)
    enricher.poll()
    assert enricher.roots is not None and enricher.roots.roots == (root,)
    assert enricher.logs is not None and enricher.logs.paths == [str(log)]


def test_a_write_outside_every_root_looks_again_and_reads_the_new_logs_last_lines(tmp_path: Path) -> None:
    import time

    from agent.sensor.outbox import Candidate

    now = (int(time.time()) - 30) * 1000
    clock = FakeClock(now)
    enricher = Enricher(EnrichConfig(), clock, roots=WebRoots([]))
    www = tmp_path / "www"
    www.mkdir()
    log = tmp_path / "access.log"
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now // 1000))
    log.write_text("x" * 100 + f'\n1.2.3.4 - - [{stamp}] "POST /up.php HTTP/1.1" 200 5 "-" "ua"\n')
    root = WebRoot("nginx", bytes(www), "/", ("php",), ((str(log), "combined"),), ())
    enricher.rediscover = lambda: ([root], [(str(log), "combined")])
    clock.advance(6)  # the last look was at start
    shell = www / "s.php"
    shell.write_text("<?php")
    enricher.arm()
    ctx = enricher(Candidate(bytes(shell), now, b"/usr/sbin/php-fpm8.2", bytes(shell), "php-fpm8.2"))
    assert ctx is not None and ctx["root"]["in"] is True
    assert [r["url"] for r in ctx["req"]] == ["/up.php"]  # written before the log was found
