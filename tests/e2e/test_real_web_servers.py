"""Real web servers, not named copies: nginx (WebDAV PUT, through its body
temp file and a rename) and PHP-FPM (a script writing a web shell), both as
www-data, watched by `rarewrite agent run` on the real kernel. The packages
come from Debian (installed here when missing, as root)."""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_live_agent import start_agent, wait_rows
from tests.support import php_site, procs
from tests.support.writers import www_tempdir

pytestmark = [pytest.mark.root, pytest.mark.slow]
PHP_FPM, NGINX = php_site.PHP_FPM, php_site.NGINX


@pytest.fixture
def servers() -> Iterator[tuple[str, int]]:
    why = php_site.installed()
    if why:
        pytest.skip(why)
    with www_tempdir("rw-real-") as base:
        www, run = f"{base}/www", f"{base}/run"
        os.makedirs(f"{www}/uploads")
        os.makedirs(f"{www}/dav")
        os.makedirs(run)
        for d in (www, f"{www}/uploads", f"{www}/dav"):
            shutil.chown(d, 33, 33)
        port = procs.free_port()
        Path(f"{base}/nginx.conf").write_text(f"""
user www-data;
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/nginx.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {www}/.body;
  server {{
    listen 127.0.0.1:{port};
    root {www};
    location /dav/ {{ dav_methods PUT; }}
    location ~ \\.php$ {{
      fastcgi_pass unix:{run}/php.sock;
      include /etc/nginx/fastcgi_params;
      fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
    }}
  }}
}}
""")
        Path(f"{base}/php-fpm.conf").write_text(f"""
[global]
pid = {run}/php-fpm.pid
error_log = {run}/php-fpm.log
daemonize = yes
[www]
user = www-data
group = www-data
listen = {run}/php.sock
listen.owner = www-data
pm = static
pm.max_children = 1
""")
        Path(f"{www}/up.php").write_text(
            f'<?php file_put_contents("{www}/uploads/" . basename($_GET["n"]), "<?php system($_GET[1]); ?>");\n'
        )
        with php_site.serving(base, run):
            yield www, port


def http(method: str, url: str, body: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=body, method=method)  # noqa: S310 - loopback test server
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback test server
        return int(r.status)


def test_nginx_put_and_php_fpm_uploads_are_caught(servers: tuple[str, int], tmp_path: Path) -> None:
    www, port = servers
    base = f"http://127.0.0.1:{port}"
    with procs.collector(str(tmp_path)) as c:
        agent, _, _ = start_agent(tmp_path, c.url, www)
        try:
            for name in ("shell-1.php", "shell-2.php"):
                assert http("GET", f"{base}/up.php?n={name}") == 200
            for _ in range(6):  # overwriting an existing file creates nothing: cc stays 1
                assert http("GET", f"{base}/up.php?n=again.php") == 200
            assert (
                http(
                    "PUT", f"{base}/dav/cmd.jsp", b"<% Runtime.getRuntime().exec(request.getParameter(1)); %>"
                )
                == 201
            )
            want = {
                (PHP_FPM, f"{www}/uploads/shell-1.php", 1),
                (PHP_FPM, f"{www}/uploads/shell-2.php", 1),
                (PHP_FPM, f"{www}/uploads/again.php", 1),
                (NGINX, f"{www}/dav/cmd.jsp", 1),  # the rename from nginx's body temp file
            }
            got = wait_rows(c.db, want)
            assert want <= got
            extra = {r for r in got - want if not r[1].startswith(f"{www}/.body/")}
            assert extra == set()  # only nginx's own temp file besides: it is a creation too
        finally:
            procs.stop(agent)
