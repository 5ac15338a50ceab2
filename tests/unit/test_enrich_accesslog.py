"""Access logs: formats compiled to parsers, logs followed on real files
(rotation, truncation, FIFOs, bursts) and the requests kept, by time."""

from __future__ import annotations

import logging
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import pytest

from agent.sensor.enrich.accesslog import AccessLogs, Request, compile_format, url_path

BASE = 1_796_415_312  # 04/Dec/2026:20:15:12 +0000


def _epoch(text: str) -> int:
    return int(datetime.strptime(text, "%d/%b/%Y:%H:%M:%S %z").timestamp()) * 1000


class Clock:
    def __init__(self, now: float = BASE + 1.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def line(ts: float = BASE, url: str = "/x", method: str = "GET", client: str = "203.0.113.7") -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(ts))
    return f'{client} - - [{stamp}] "{method} {url} HTTP/1.1" 200 27 "http://site/form.html" "curl/8.1"\n'


def append(path: Path, *texts: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(texts))


def urls(reqs: list[Request]) -> list[str]:
    return [r.url for r in reqs]


@pytest.fixture
def access(tmp_path: Path) -> Path:
    p = tmp_path / "access.log"
    p.write_text(line(url="/before-start"))
    return p


def follow(path: Path, clock: Optional[Clock] = None, **kw: int) -> AccessLogs:
    return AccessLogs([(str(path), "combined")], clock=clock or Clock(), **kw)


# ------------------------------------------------------------------ formats


def test_nginx_combined() -> None:
    parse = compile_format("combined")
    r = parse(
        '203.0.113.7 - - [04/Dec/2026:20:15:12 +0000] "POST /upload.php HTTP/1.1" 200 27 '
        '"http://site/form.html" "curl/8.1"'
    )
    assert r == Request(BASE * 1000, "203.0.113.7", "POST", "/upload.php", 200, 27,
                        "http://site/form.html", "curl/8.1", "")  # fmt: skip
    assert r.ts_ms == _epoch("04/Dec/2026:20:15:12 +0000")


def test_the_time_offset_is_honoured() -> None:
    r = compile_format("common")('h - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.0" 200 2326')
    assert r is not None and r.ts_ms == _epoch("10/Oct/2000:13:55:36 -0700") == 971211336000


def test_apache_combined_with_escaped_quotes_and_nginx_hex_escapes() -> None:
    parse = compile_format("combined")
    r = parse('10.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /a.gif HTTP/1.0" 200 2326 '
              '"http://www.example.com/start.html" "Mozilla/4.08 \\"quoted\\" [en] (Win98; I ;Nav)"')  # fmt: skip
    assert r is not None and r.user_agent == 'Mozilla/4.08 "quoted" [en] (Win98; I ;Nav)'
    assert r.client == "10.0.0.1" and r.referer == "http://www.example.com/start.html"
    r = parse(
        '10.0.0.1 - - [10/Oct/2000:13:55:36 -0700] "GET /caf\\xC3\\xA9.php HTTP/1.1" 200 - "-" "a\\x22b"'
    )
    assert r is not None and r.url == "/café.php" and r.user_agent == 'a"b' and r.bytes_sent == 0
    assert r.referer == ""


def test_common_has_no_referer_or_agent() -> None:
    r = compile_format("common")('::1 - - [10/Oct/2000:13:55:36 +0000] "DELETE /x?y=1 HTTP/1.1" 404 -')
    assert r == Request(_epoch("10/Oct/2000:13:55:36 +0000"), "::1", "DELETE", "/x?y=1", 404, 0, "", "", "")


def test_vhost_combined() -> None:
    r = compile_format("vhost_combined")('www.example.com:443 198.51.100.2 - - [10/Oct/2000:13:55:36 +0000] '
                                         '"PUT /up HTTP/2.0" 201 512 "-" "python-requests/2.31"')  # fmt: skip
    assert r is not None and (r.client, r.method, r.url, r.status, r.bytes_sent) == (
        "198.51.100.2", "PUT", "/up", 201, 512)  # fmt: skip
    assert r.user_agent == "python-requests/2.31"


def test_a_malformed_request_is_kept_with_no_method() -> None:
    parse = compile_format("combined")
    for req in ("-", "\\x16\\x03\\x01\\x02\\x00\\x01", "GET", "GET /a b HTTP/1.1", "<? /x"):
        r = parse(f'203.0.113.9 - - [04/Dec/2026:20:15:12 +0000] "{req}" 400 150 "-" "-"')
        assert r is not None and (r.method, r.url, r.status) == ("", "", 400), req
    assert parse("not a log line") is None
    assert parse('1.2.3.4 - - [32/Foo/2026:20:15:12 +0000] "GET / HTTP/1.1" 200 1 "-" "-"') is None


def test_custom_nginx_format_with_iso_time_and_request_time() -> None:
    fmt = ('$remote_addr - $remote_user [$time_iso8601] "$request_method $scheme://$host$request_uri" '
           '$status $body_bytes_sent $request_time "$http_user_agent" $upstream_addr $unknown_thing')  # fmt: skip
    parse = compile_format(fmt)
    r = parse('2001:db8::1 - alice [2026-12-04T21:15:12+01:00] "POST https://site/upload.php?x=1" '
              '200 27 0.004 "curl/8.1 \\x22q\\x22" 127.0.0.1:9000 -')  # fmt: skip
    assert r == Request(
        BASE * 1000, "2001:db8::1", "POST", "/upload.php?x=1", 200, 27, "", 'curl/8.1 "q"', ""
    )
    parse = compile_format("$msec $remote_addr $request_method $uri $args $status")
    r = parse("1796415312.123 10.1.1.1 GET /a.php x=1&y=2 200")
    assert r is not None and (r.ts_ms, r.url, r.status) == (BASE * 1000 + 123, "/a.php?x=1&y=2", 200)
    r = compile_format('{"t":"$time_iso8601","ip":"$remote_addr","r":"$request"}')(
        '{"t":"2026-12-04T20:15:12+00:00","ip":"1.1.1.1","r":"GET /\\u0022x HTTP/1.1"}'
    )
    assert r is not None and r.url == '/"x' and r.ts_ms == BASE * 1000


def test_apache_logformat_strings() -> None:
    fmt = '%a %{c}a %l %u %t \\"%r\\" %>s %O %I %D %T %v %p \\"%{Referer}i\\" \\"%{User-Agent}i\\" %%'
    parse = compile_format(fmt)
    r = parse('192.0.2.5 10.0.0.9 - - [04/Dec/2026:20:15:12 +0000] "GET /x.php HTTP/1.1" 200 900 300 '
              '1234 0 www.example.com 80 "-" "Go-http-client/1.1" %')  # fmt: skip
    assert r == Request(BASE * 1000, "192.0.2.5", "GET", "/x.php", 200, 900, "", "Go-http-client/1.1", "")
    r = compile_format("%{msec}t %h %m %U%q %s %B")("1796415312456 h POST /a.php?b=1 302 0")
    assert r is not None and (r.ts_ms, r.method, r.url, r.status) == (
        BASE * 1000 + 456,
        "POST",
        "/a.php?b=1",
        302,
    )


def test_fields_written_together_split_and_a_misfit_line_fails_fast() -> None:
    parse = compile_format('[$time_local] $remote_addr $uri$is_args$args $status "$http_user_agent"')
    for target in ("/a.php?x=1&y=2", "/a.php"):
        r = parse(f'[04/Dec/2026:20:15:12 +0000] 1.2.3.4 {target} 200 "ua"')
        assert r is not None and r.url == target and r.status == 200
    parse = compile_format('$remote_addr:$remote_port [$time_local] "$request" $a:$b:$c $status')
    r = parse('2001:db8::1:5555 [04/Dec/2026:20:15:12 +0000] "GET / HTTP/1.1" a:b:c 200')
    assert r is not None and r.client == "2001:db8::1"
    misfit = '1.1.1.1:1 [04/Dec/2026:20:15:12 +0000] "GET / HTTP/1.1" ' + ":" * 16000 + "x y 200"
    assert parse(misfit) is None  # backtracking over every split would take minutes (CI's time limit)


def test_long_fields_are_cut() -> None:
    r = compile_format("combined")(
        f'1.2.3.4 - - [04/Dec/2026:20:15:12 +0000] "GET /{"a" * 5000} HTTP/1.1" 200 1 "-" "{"u" * 5000}"'
    )
    assert r is not None and len(r.url) == 2048 and len(r.user_agent) == 512


@pytest.mark.parametrize(
    ("fmt", "says"),
    [
        ("nonsense", "no $variable"),
        ("$remote_addr $status", "no time field"),
        ("%h %l %u %s", "no time field"),
        ("%h %Z %t", "%Z"),
        ("%h % %t", "starts no directive"),
        ("%{%Y-%m-%d}t %h", "only %t"),
    ],
)
def test_a_format_that_cannot_compile_says_why(fmt: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        compile_format(fmt)


def test_a_bad_format_names_its_log(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"access\.log"):
        AccessLogs([(str(tmp_path / "access.log"), "bogus")])
    with pytest.raises(ValueError, match="twice"):
        AccessLogs([(str(tmp_path / "a.log"), "combined"), (str(tmp_path / "a.log"), "common")])


def test_url_path() -> None:
    assert url_path("/a//b/./c/../d%20e.php?x=/y#f") == "/a/b/d e.php"
    assert url_path("/%2e%2e/etc/passwd") == "/etc/passwd"
    assert url_path("https://site/up/x.php?q") == "/up/x.php"
    assert url_path("/dir/") == "/dir/" and url_path("*") == "*"


# ------------------------------------------------------------------ tailing


def test_starts_at_the_end_and_sees_appended_lines(access: Path) -> None:
    logs = follow(access)
    assert logs.poll() == 0
    append(access, line(url="/a"), line(url="/b"))
    assert logs.poll() == 2
    assert urls(logs.around(BASE * 1000, 0, 0)) == ["/a", "/b"]
    assert logs.poll() == 0
    assert logs.counters["lines"] == 2


def test_a_partial_line_is_completed_at_the_next_poll(access: Path) -> None:
    logs = follow(access)
    text = line(url="/slow")
    append(access, text[:30])
    assert logs.poll() == 0
    append(access, text[30:])
    assert logs.poll() == 1
    assert urls(logs.around(BASE * 1000, 0, 0)) == ["/slow"]


def test_rotation_by_rename_loses_and_doubles_nothing(access: Path) -> None:
    logs = follow(access)
    append(access, line(url="/1"))
    assert logs.poll() == 1
    append(access, line(url="/2"))
    access.rename(access.with_name("access.log.1"))
    append(access.with_name("access.log.1"), line(url="/3"))  # the server writes on until it reopens
    assert logs.poll() == 2
    access.write_text(line(url="/4"))
    append(access.with_name("access.log.1"), line(url="/5"))  # a worker that has not reopened yet
    append(access, line(url="/6"))
    logs.poll()
    logs.poll()
    append(access, line(url="/7"))
    logs.poll()
    assert sorted(urls(logs.around(BASE * 1000, 0, 0))) == ["/1", "/2", "/3", "/4", "/5", "/6", "/7"]
    assert logs.counters["rotated"] == 1


def test_a_rotated_file_is_let_go_once_the_new_one_is_written(access: Path) -> None:
    clock = Clock()
    logs = follow(access, clock)
    access.rename(access.with_name("access.log.1"))
    logs.poll()
    access.write_text("")
    logs.poll()
    assert logs._logs[0].old is not None  # the new file is still empty
    append(access, line(url="/new"))
    logs.poll()
    assert logs._logs[0].old is None
    access.unlink()
    logs.poll()
    clock.now += 60  # gone with no new file: let go after the grace
    logs.poll()
    assert logs._logs[0].old is None and logs._logs[0].cur is None


def test_copytruncate(access: Path) -> None:
    logs = follow(access)
    append(access, line(url="/a"), line(url="/b"))
    logs.poll()
    with open(access, "r+") as f:
        f.truncate(0)
    append(access, line(url="/c"))
    assert logs.poll() == 1
    assert urls(logs.around(BASE * 1000, 0, 0)) == ["/a", "/b", "/c"]
    assert logs.counters["truncated"] == 1


def test_a_log_created_after_start_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "later.log"
    logs = follow(path)
    assert logs.poll() == 0
    path.write_text(line(url="/first") + line(url="/second"))
    assert logs.poll() == 2
    assert logs.counters["unreadable"] == 0


def test_a_fifo_at_the_log_path_cannot_block(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "access.log"
    os.mkfifo(path)
    caplog.set_level(logging.WARNING, "rarewrite.enrich")
    logs = follow(path)
    for _ in range(5):
        assert logs.poll() == 0  # an open() or read() of the FIFO would hang here
    assert logs.counters["unreadable"] == 1
    assert len([r for r in caplog.records if "cannot be read" in r.getMessage()]) == 1
    path.unlink()
    path.write_text(line(url="/real"))  # what replaces the FIFO is new: read from its start
    assert logs.poll() == 1


def test_a_directory_at_the_log_path_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "access.log").mkdir()
    logs = follow(tmp_path / "access.log")
    assert logs.poll() == 0 and logs.counters["unreadable"] == 1


def test_an_over_long_line_is_dropped_and_the_next_one_parsed(access: Path) -> None:
    logs = follow(access, max_line=300)
    append(access, line(url="/" + "a" * 400), line(url="/ok"))
    assert logs.poll() == 1
    append(access, line(url="/" + "b" * 1000)[:700])  # too long before its newline comes
    assert logs.poll() == 0
    append(access, "bbbb" * 100 + "\n", line(url="/ok2"))
    assert logs.poll() == 1
    assert urls(logs.around(BASE * 1000, 0, 0)) == ["/ok", "/ok2"]
    assert logs.counters["too_long"] == 2


def test_read_per_poll_bounds_each_poll(access: Path) -> None:
    logs = follow(access, read_per_poll=250)
    texts = [line(url=f"/{i:03d}") for i in range(10)]
    append(access, *texts)
    per_poll = []
    while True:
        n = logs.poll()
        if not n and logs._logs[0].cur.offset == access.stat().st_size:  # type: ignore[union-attr]
            break
        per_poll.append(n)
    assert max(per_poll) <= 250 // len(texts[0]) + 1 and sum(per_poll) == 10
    assert urls(logs.around(BASE * 1000, 0, 0)) == [f"/{i:03d}" for i in range(10)]


def test_unparsed_lines_are_counted(access: Path) -> None:
    logs = follow(access)
    append(access, "garbage\n", "\n", line(url="/ok"))
    assert logs.poll() == 1
    assert logs.counters["unparsed"] == 1 and logs.counters["lines"] == 2


# ------------------------------------------------------------------ queries


def test_around_bounds_filter_and_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    logs = AccessLogs([(str(a), "combined"), (str(b), "combined")], clock=Clock(BASE + 100))
    append(a, *(line(BASE + d, url=f"/a{d}") for d in (-3, -2, 0, 2, 3)))
    append(b, line(BASE + 1, url="/b1"), line(BASE - 1, url="/b-1"))  # a little out of order
    logs.poll()
    t = BASE * 1000
    assert urls(logs.around(t, 2000, 2000)) == ["/a0", "/b-1", "/b1", "/a-2", "/a2"]
    assert urls(logs.around(t, 2000, 2000, logs=[str(a)])) == ["/a0", "/a-2", "/a2"]
    assert urls(logs.around(t, 1999, 0)) == ["/a0", "/b-1"]
    assert logs.around(t + 500, 0, 0) == []


def test_for_url(access: Path) -> None:
    logs = follow(access, Clock(BASE + 100))
    append(access, line(BASE - 5, url="/up/shell.php?cmd=id"), line(BASE, url="/up/sh%65ll.php"),
           line(BASE + 1, url="//up/./shell.php#x"), line(BASE + 2, url="/up/other.php"),
           line(BASE + 3, url="/up/shell.php.bak"), line(BASE + 4, "-", "-"))  # fmt: skip
    logs.poll()
    assert urls(logs.for_url("/up/shell.php", 0)) == ["/up/shell.php?cmd=id", "/up/sh%65ll.php",
                                                      "//up/./shell.php#x"]  # fmt: skip
    assert urls(logs.for_url("/up/shell.php", BASE * 1000)) == ["/up/sh%65ll.php", "//up/./shell.php#x"]
    assert logs.for_url("/up/shell.php", 0, logs=["/elsewhere.log"]) == []


def test_since_numbers_every_request(access: Path) -> None:
    logs = follow(access)
    assert logs.since(0) == (0, [])
    append(access, line(url="/1"), line(url="/2"))
    logs.poll()
    seq, new = logs.since(0)
    assert seq == 2 and urls(new) == ["/1", "/2"]
    append(access, line(url="/3"), "junk\n")
    logs.poll()
    seq, new = logs.since(seq)
    assert seq == 3 and urls(new) == ["/3"]
    assert logs.since(seq) == (3, [])
    assert urls(logs.since(1)[1]) == ["/2", "/3"]


def test_keep_s_expires_by_log_time(access: Path) -> None:
    clock = Clock(BASE)
    logs = follow(access, clock, keep_s=60)
    append(access, line(BASE - 120, url="/stale"), line(BASE - 30, url="/old"), line(BASE, url="/new"))
    logs.poll()
    assert urls(logs.around(BASE * 1000, 600_000, 0)) == ["/new", "/old"]
    clock.now += 45
    logs.poll()
    assert urls(logs.around(BASE * 1000, 600_000, 0)) == ["/new"]
    assert urls(logs.since(0)[1]) == ["/new"]


def test_max_requests_drops_the_oldest(access: Path) -> None:
    logs = follow(access, Clock(BASE + 100), max_requests=3)
    append(access, *(line(BASE + i, url=f"/{i}") for i in range(5)))
    logs.poll()
    assert urls(logs.around(BASE * 1000, 0, 10_000)) == ["/2", "/3", "/4"]
    assert urls(logs.since(0)[1]) == ["/2", "/3", "/4"]
    assert logs.counters["dropped"] == 2


def test_nearest_walks_out_from_the_time_and_stops_at_k(access: Path) -> None:
    logs = follow(access, Clock(BASE + 10))
    append(access, *(line(BASE + i, url=f"/p{i}") for i in range(-5, 6)))
    logs.poll()
    got = logs.nearest(BASE * 1000 + 1400, 3000, 3)
    assert urls(got) == ["/p1", "/p2", "/p0"]
    assert urls(logs.nearest(BASE * 1000, 1000, 10)) == [
        "/p0",
        "/p-1",
        "/p1",
    ]  # the window bounds it; a tie: the earlier
    assert logs.nearest(BASE * 1000, 1000, 10, logs=["/elsewhere.log"]) == []
