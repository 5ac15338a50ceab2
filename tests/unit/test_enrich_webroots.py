"""Web roots read from nginx and Apache config trees written into tmp_path,
and the file placement the alerts are enriched with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

from agent.sensor.enrich import webroots
from agent.sensor.enrich.webroots import Placement, WebRoot, WebRoots, configured, discover


def _tree(top: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = top / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _nginx(tmp_path: Path, files: dict[str, str]) -> tuple[list[WebRoot], list[str]]:
    _tree(tmp_path / "nginx", files)
    return discover(str(tmp_path / "nginx" / "nginx.conf"), ())


def _by_root(roots: list[WebRoot]) -> dict[bytes, WebRoot]:
    assert len({r.root for r in roots}) == len(roots)
    return {r.root: r for r in roots}


# Debian 12's nginx.conf and default site, the php location enabled, no access_log line
DEBIAN_NGINX = """\
user www-data;
worker_processes auto;
pid /run/nginx.pid;
include modules-enabled/*.conf;

events {
\tworker_connections 768;
\t# multi_accept on;
}

http {
\tsendfile on;
\ttypes_hash_max_size 2048;
\tinclude mime.types;
\tdefault_type application/octet-stream;
\tssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3; # Dropping SSLv3, ref: POODLE
\tgzip on;
\tinclude conf.d/*.conf;
\tinclude sites-enabled/*;
}
"""
DEBIAN_DEFAULT_SITE = """\
server {
\tlisten 80 default_server;
\tlisten [::]:80 default_server;
\troot /var/www/html;
\tindex index.html index.htm index.nginx-debian.html;
\tserver_name _;

\tlocation / {
\t\ttry_files $uri $uri/ =404;
\t}

\t# pass PHP scripts to FastCGI server
\tlocation ~ \\.php$ {
\t\tinclude snippets/fastcgi-php.conf;
\t\tfastcgi_pass unix:/run/php/php8.2-fpm.sock;
\t}

\t#location ~ /\\.ht {
\t#\tdeny all;
\t#}
}
"""
FASTCGI_PHP = """\
# regex to split $uri to $fastcgi_script_name and $fastcgi_path
fastcgi_split_path_info ^(.+?\\.php)(/.*)$;
try_files $fastcgi_script_name =404;
set $path_info $fastcgi_path_info;
fastcgi_param PATH_INFO $path_info;
fastcgi_index index.php;
include fastcgi.conf;
"""
MIME_TYPES = """\
types {
    text/html                                        html htm shtml;
    application/javascript                           js;
}
"""


def test_debian_default_site_with_php(tmp_path: Path) -> None:
    roots, problems = _nginx(
        tmp_path,
        {
            "nginx.conf": DEBIAN_NGINX,
            "mime.types": MIME_TYPES,
            "fastcgi.conf": "fastcgi_param  SCRIPT_FILENAME    $document_root$fastcgi_script_name;\n",
            "snippets/fastcgi-php.conf": FASTCGI_PHP,
            "sites-enabled/default": DEBIAN_DEFAULT_SITE,
        },
    )
    assert problems == []
    assert roots == [
        WebRoot(
            server="nginx",
            root=b"/var/www/html",
            url_prefix="/",
            executable=("php",),
            access_logs=(("/var/log/nginx/access.log", "combined"),),
            names=("_",),
        )
    ]
    where = WebRoots(roots)
    assert len(where) == 1
    assert where.place(b"/var/www/html/uploads/x.php") == Placement(roots[0], "/uploads/x.php", True)
    assert where.place(b"/var/www/html/uploads/x.jpg") == Placement(roots[0], "/uploads/x.jpg", False)
    assert where.place(b"/var/www/html2/x.php") is None
    assert where.place(b"/var/www/x.php") is None
    assert where.place(b"/var/www/html") == Placement(roots[0], "/", False)


LOG_FORMAT = """\
http {
    log_format main '$remote_addr - $remote_user [$time_local] "$request" '
                    '$status $body_bytes_sent';   # two pieces, joined
    log_format  js escape=json '{"uri":"$uri"}';
    access_log /var/log/nginx/all.log main;
    root /srv/default;
    include conf.d/*.conf;
    include sites/*.conf;
}
"""
SITE_A = r"""
server {
    server_name a.example "semi;brace{hash#.example";  # quoted ; { # are text
    add_header X-Note "a \"quoted\" } ; {" always;
    add_header X-Other 'it\'s # not a comment';
    root /srv/a/;
    access_log /var/log/nginx/a.log main;
    access_log /var/log/nginx/a.json js;
    location /static/ { root /srv/static; }
    location /media/ {
        alias /srv/media/files/;
        access_log off;
    }
    location / {
        location /deep/ { root /srv/deep; }
    }
    location ~* "\.(php|phtml)$" { fastcgi_pass 127.0.0.1:9000; }
    location ~ /\.ht { deny all; }
}
"""
SITE_B = r"""
server {
    server_name b.example;
    access_log off;
    location ~ \.cgi$ { include fcgiwrap.conf; }
    location ~ ^/cgi-bin/.*\.pl$ { fastcgi_pass unix:/run/fcgiwrap.socket; }
}
"""
SITE_C = """\
server {
    root /srv/c;
    location ~ \\.php$ { fastcgi_pass x }
}
"""


def test_two_servers_includes_locations_logs_and_errors(tmp_path: Path) -> None:
    roots, problems = _nginx(
        tmp_path,
        {
            "nginx.conf": LOG_FORMAT,
            "conf.d/loop.conf": "include conf.d/loop.conf;\n",
            "fcgiwrap.conf": "fastcgi_pass unix:/run/fcgiwrap.socket;\ninclude fastcgi_params;\n",
            "fastcgi_params": "fastcgi_param QUERY_STRING $query_string;\n",
            "sites/a.conf": SITE_A,
            "sites/b.conf": SITE_B,
            "sites/c.conf": SITE_C,
        },
    )
    top = tmp_path / "nginx"
    main = '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent'
    a_logs = (("/var/log/nginx/a.log", main), ("/var/log/nginx/a.json", '{"uri":"$uri"}'))
    names = ("a.example", "semi;brace{hash#.example")
    got = _by_root(roots)
    assert got[b"/srv/a"] == WebRoot("nginx", b"/srv/a", "/", ("php", "phtml"), a_logs, names)
    assert got[b"/srv/static"] == WebRoot("nginx", b"/srv/static", "/", ("php", "phtml"), a_logs, names)
    assert got[b"/srv/deep"].url_prefix == "/"
    assert got[b"/srv/media/files"] == WebRoot(
        "nginx", b"/srv/media/files", "/media/", ("php", "phtml"), (), names
    )
    # b has no root of its own: the http one, with no logs and only the cgi location understood
    assert got[b"/srv/default"] == WebRoot("nginx", b"/srv/default", "/", ("cgi",), (), ("b.example",))
    # c.conf stops at its error; what came before it still counts
    assert got[b"/srv/c"].access_logs == (("/var/log/nginx/all.log", main),)
    assert problems == [
        f"nginx: {top}/conf.d/loop.conf: line 1: include loop: {top}/conf.d/loop.conf is already being read",
        f"nginx: {top}/sites/c.conf: line 3: unexpected '}}'",  # parse problems come first
        f"nginx: {top}/sites/b.conf: line 6: cannot tell which extensions location ^/cgi-bin/.*\\.pl$ executes",
    ]
    where = WebRoots(roots)
    placed = where.place(b"/srv/media/files/up/shell.PHP")
    assert placed is not None
    assert (placed.root.root, placed.url, placed.executable) == (
        b"/srv/media/files",
        "/media/up/shell.PHP",
        True,
    )
    placed = where.place(b"/srv/deep/a/b.txt")
    assert placed is not None
    assert (placed.root.root, placed.url) == (b"/srv/deep", "/a/b.txt")


def test_no_access_log_anywhere_is_nginx_default(tmp_path: Path) -> None:
    roots, problems = _nginx(tmp_path, {"nginx.conf": "http { server { root /srv/x; } }\n"})
    assert problems == []
    assert roots[0].access_logs == (("/var/log/nginx/access.log", "combined"),)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('http { server { root "/srv/x; } }\n', "line 1: unterminated quoted string"),
        ('http { server { root "/srv/x"x; } }\n', "line 1: unexpected 'x' after a quoted string"),
        ("http { server { root /srv/x; }\n", "line 2: unexpected end of file, expecting '}'"),
        ("http { server { root /srv/x\n", "line 2: unexpected end of file, expecting ';' or '}'"),
        ("http { ; }\n", "line 1: unexpected ';'"),
        (
            "http {\n include missing.conf;\n}\n",
            "line 2: cannot read {top}/missing.conf: No such file or directory",
        ),
        (
            "http { server { root /srv/$host; } }\n",
            "line 1: root /srv/$host: a path with variables is not followed",
        ),
        (
            "http { server { location ~ ^/x/(.*)$ { alias /srv/$1; } } }\n",
            "line 1: alias in location ^/x/(.*)$ is not followed",
        ),
    ],
)
def test_nginx_syntax_problems_are_one_line_each(tmp_path: Path, text: str, problem: str) -> None:
    _roots, problems = _nginx(tmp_path, {"nginx.conf": text})
    top = tmp_path / "nginx"
    assert problems == [f"nginx: {top}/nginx.conf: " + problem.replace("{top}", str(top))]


def test_includes_nested_too_deep_and_too_big_are_reported(tmp_path: Path) -> None:
    files = {f"d{i}.conf": f"include d{i + 1}.conf;\n" for i in range(20)}
    files["nginx.conf"] = "include d0.conf;\nhttp { include big.conf; server { root /srv/ok; } }\n"
    files["big.conf"] = "#" * (webroots.MAX_FILE_BYTES + 1)
    roots, problems = _nginx(tmp_path, files)
    top = tmp_path / "nginx"
    assert [r.root for r in roots] == [b"/srv/ok"]
    assert problems == [
        f"nginx: {top}/d15.conf: line 1: includes nested deeper than 16: {top}/d16.conf not read",
        f"nginx: {top}/nginx.conf: line 2: cannot read {top}/big.conf: larger than 1 MiB",
    ]


def test_a_fifo_in_the_tree_does_not_hang(tmp_path: Path) -> None:
    _tree(tmp_path / "nginx", {"nginx.conf": "http { include conf.d/*; server { root /srv/ok; } }\n"})
    (tmp_path / "nginx" / "conf.d").mkdir()
    os.mkfifo(tmp_path / "nginx" / "conf.d" / "pipe")
    roots, problems = discover(str(tmp_path / "nginx" / "nginx.conf"), ())
    assert [r.root for r in roots] == [b"/srv/ok"]
    assert problems == [
        f"nginx: {tmp_path}/nginx/nginx.conf: line 1: cannot read {tmp_path}/nginx/conf.d/pipe: not a regular file"
    ]


def test_missing_main_configs_mean_no_server(tmp_path: Path) -> None:
    assert discover(str(tmp_path / "nginx.conf"), (str(tmp_path / "apache2.conf"),)) == ([], [])
    assert discover(None, ()) == ([], [])


# A Debian 12 apache2 tree, cut down to the lines that matter
APACHE_TREE = {
    "envvars": """\
unset HOME
if [ "${APACHE_CONFDIR##/etc/apache2-}" != "${APACHE_CONFDIR}" ] ; then
\tSUFFIX="-${APACHE_CONFDIR##/etc/apache2-}"
else
\tSUFFIX=
fi
export APACHE_RUN_USER=www-data
export APACHE_LOG_DIR=/var/log/apache2-test$SUFFIX
""",
    "apache2.conf": """\
# This is the main Apache server configuration file.
#ServerRoot "/etc/apache2"
DefaultRuntimeDir ${APACHE_RUN_DIR}
Timeout 300
ErrorLog ${APACHE_LOG_DIR}/error.log
IncludeOptional mods-enabled/*.load
IncludeOptional mods-enabled/*.conf
Include ports.conf
<Directory /var/www/>
\tOptions Indexes FollowSymLinks
\tAllowOverride None
\tRequire all granted
</Directory>
AccessFileName .htaccess
LogFormat "%v:%p %h %l %u %t \\"%r\\" %>s %O \\"%{Referer}i\\" \\"%{User-Agent}i\\"" vhost_combined
LogFormat "%h %l %u %t \\"%r\\" %>s %O \\"%{Referer}i\\" \\"%{User-Agent}i\\"" \\
  combined
LogFormat "%h %l %u %t \\"%r\\" %>s %O" common
IncludeOptional conf-enabled/*.conf
IncludeOptional sites-enabled/*.conf
""",
    "ports.conf": "Listen 80\n<IfModule ssl_module>\n\tListen 443\n</IfModule>\n",
    "mods-enabled/php8.2.load": "LoadModule php_module /usr/lib/apache2/modules/libphp8.2.so\n",
    "mods-enabled/php8.2.conf": """\
<FilesMatch ".+\\.ph(?:ar|p|tml)$">
    SetHandler application/x-httpd-php
</FilesMatch>
<FilesMatch ".+\\.phps$">
    SetHandler application/x-httpd-php-source
    Require all denied
</FilesMatch>
<FilesMatch "^\\.ph(?:ar|p|ps|tml)$">
    Require all denied
</FilesMatch>
<IfModule mod_userdir.c>
    <Directory /home/*/public_html>
        php_admin_flag engine Off
    </Directory>
</IfModule>
""",
    "mods-enabled/alias.load": "LoadModule alias_module /usr/lib/apache2/modules/mod_alias.so\n",
    "mods-enabled/alias.conf": """\
<IfModule alias_module>
\tAlias /icons/ "/usr/share/apache2/icons/"
\t<Directory "/usr/share/apache2/icons">
\t\tRequire all granted
\t</Directory>
</IfModule>
""",
    "conf-enabled/other-vhosts-access-log.conf": (
        "CustomLog ${APACHE_LOG_DIR}/other_vhosts_access.log vhost_combined\n"
    ),
    "conf-enabled/serve-cgi-bin.conf": """\
<IfModule mod_alias.c>
\t<IfModule mod_cgid.c>
\t\tDefine ENABLE_USR_LIB_CGI_BIN
\t</IfModule>
\t<IfDefine ENABLE_USR_LIB_CGI_BIN>
\t\tScriptAlias /cgi-bin/ /usr/lib/cgi-bin/
\t\t<Directory "/usr/lib/cgi-bin">
\t\t\tOptions +ExecCGI -MultiViews +SymLinksIfOwnerMatch
\t\t</Directory>
\t</IfDefine>
</IfModule>
""",
    "sites-enabled/site.conf": """\
<VirtualHost *:80>
\tServerName site.example
\tServerAlias www.site.example site.test
\tServerAdmin webmaster@localhost
\tDocumentRoot /var/www/site
\tErrorLog ${APACHE_LOG_DIR}/error.log
\tCustomLog ${APACHE_LOG_DIR}/access.log combined
\tCustomLog "|/usr/bin/rotatelogs /var/log/x 86400" common
\tCustomLog ${APACHE_LOG_DIR}/short.log "%h %t %r"
\tAlias /static/ /srv/static/
\tAddHandler cgi-script .cgi .pl
</VirtualHost>
""",
}
COMBINED = '%h %l %u %t "%r" %>s %O "%{Referer}i" "%{User-Agent}i"'
VHOST_COMBINED = '%v:%p %h %l %u %t "%r" %>s %O "%{Referer}i" "%{User-Agent}i"'


def test_debian_apache_tree(tmp_path: Path) -> None:
    _tree(tmp_path / "apache2", APACHE_TREE)
    roots, problems = discover(None, (str(tmp_path / "apache2" / "apache2.conf"),))
    assert problems == []
    got = _by_root(roots)
    site_logs = (
        ("/var/log/apache2-test/access.log", COMBINED),
        ("/var/log/apache2-test/short.log", "%h %t %r"),
    )
    main_logs = (("/var/log/apache2-test/other_vhosts_access.log", VHOST_COMBINED),)
    names = ("site.example", "www.site.example", "site.test")
    site_exts = ("cgi", "phar", "php", "phtml", "pl")
    assert got[b"/var/www/site"] == WebRoot("apache", b"/var/www/site", "/", site_exts, site_logs, names)
    assert got[b"/srv/static"] == WebRoot("apache", b"/srv/static", "/static/", site_exts, site_logs, names)
    # the main server's aliases serve every vhost too: one root, both servers' logs and handlers
    icons = got[b"/usr/share/apache2/icons"]
    assert icons == WebRoot("apache", icons.root, "/icons/", site_exts, main_logs + site_logs, names)
    assert got[b"/usr/lib/cgi-bin"].executable == ("*",)
    assert got[b"/usr/lib/cgi-bin"].url_prefix == "/cgi-bin/"
    where = WebRoots(roots)
    checks = {
        b"/var/www/site/up/x.php": ("/up/x.php", True),
        b"/var/www/site/up/x.phps": ("/up/x.phps", False),
        b"/var/www/site/x.phtml": ("/x.phtml", True),
        b"/srv/static/x.cgi": ("/static/x.cgi", True),
        b"/usr/lib/cgi-bin/no-extension": ("/cgi-bin/no-extension", True),
        b"/usr/share/apache2/icons/a.png": ("/icons/a.png", False),
    }
    for path, (url, runs) in checks.items():
        placed = where.place(path)
        assert placed is not None
        assert (placed.url, placed.executable) == (url, runs), path


def test_apache_php_fpm_addtype_and_problems(tmp_path: Path) -> None:
    _tree(
        tmp_path / "httpd",
        {
            "conf/httpd.conf": """\
ServerName main.example
DocumentRoot "/var/www/html"
CustomLog logs/access_log combined
Include conf.d/*.conf
IncludeOptional conf.d/absent/*.conf
Include missing.conf
Include conf/httpd.conf
<FilesMatch \\.php$>
    SetHandler "proxy:unix:/run/php-fpm/www.sock|fcgi://localhost"
</FilesMatch>
<VirtualHost *:80>
    ServerName v.example
    AddType application/x-httpd-php .php5
    ProxyPassMatch ^/(.*\\.phtml(/.*)?)$ fcgi://127.0.0.1:9000/var/www/html/$1
    <FilesMatch "^index\\.php$">
        SetHandler "proxy:fcgi://127.0.0.1:9000"
    </FilesMatch>
""",
            "conf.d/broken.conf": "<Directory /x>\n</Files>\nDocumentRoot /never\n",
        },
    )
    top = tmp_path / "httpd"
    roots, problems = discover(None, (str(top / "conf" / "httpd.conf"),))
    assert problems == [
        f"apache: {top}/conf.d/broken.conf: line 2: </files> without a matching <files>",
        f"apache: {top}/conf/httpd.conf: line 6: cannot read {top}/missing.conf: No such file or directory",
        f"apache: {top}/conf/httpd.conf: line 7: include loop: {top}/conf/httpd.conf is already being read",
        f"apache: {top}/conf/httpd.conf: line 11: <virtualhost> is not closed at the end of the file",
        f"apache: {top}/conf/httpd.conf: line 15: cannot tell which extensions <filesmatch ^index\\.php$> "
        "hands to proxy:fcgi://127.0.0.1:9000",
    ]
    # ServerRoot is /etc/httpd's layout: the directory above conf/
    logs = ((f"{top}/logs/access_log", "combined"),)
    # the unclosed vhost keeps what it declared: DocumentRoot inherited, its own php5 and phtml
    assert roots == [
        WebRoot(
            "apache", b"/var/www/html", "/", ("php", "php5", "phtml"), logs, ("main.example", "v.example")
        ),
    ]


def test_configured() -> None:
    assert configured("/srv/site:php,phtml") == WebRoot("config", b"/srv/site", "/", ("php", "phtml"), (), ())
    assert configured(" /srv/static/ ") == WebRoot("config", b"/srv/static", "/", (), (), ())
    assert configured("/srv/app:php@/app") == WebRoot("config", b"/srv/app", "/app", ("php",), (), ())
    assert configured("/srv/cgi:*@/cgi-bin/") == WebRoot("config", b"/srv/cgi", "/cgi-bin/", ("*",), (), ())
    assert configured("/srv/x:.PHP, .Phtml") == WebRoot("config", b"/srv/x", "/", ("php", "phtml"), (), ())
    assert configured("/srv/user@host") == WebRoot("config", b"/srv/user@host", "/", (), (), ())
    assert configured("/srv/caf\udce9") == WebRoot("config", b"/srv/caf\xe9", "/", (), (), ())
    for bad in (
        "",
        "srv/site:php",
        "/srv/site:",
        "/srv/site:php,",
        "/srv/site:ph p",
        "/srv/x:php@/a b",
        "/a\0b",
    ):
        assert configured(bad) is None, bad


def test_place_picks_the_deepest_root_and_an_executing_one_on_a_tie() -> None:
    top = WebRoot("config", b"/", "/", (), (), ())
    site = WebRoot("config", b"/srv/site", "/", (), (), ())
    site_php = WebRoot("nginx", b"/srv/site/", "/", ("php",), (), ())
    cgi = WebRoot("config", b"/srv/site/cgi", "/cgi", ("*",), (), ())
    where = WebRoots([top, site, site_php, cgi])
    assert where.roots == (top, site, site_php, cgi)
    assert where.place(b"/etc/passwd") == Placement(top, "/etc/passwd", False)
    assert where.place(b"/srv/site/a.txt") == Placement(site, "/a.txt", False)
    assert where.place(b"/srv/site/a.php") == Placement(site_php, "/a.php", True)
    assert where.place(b"/srv/site/cgi/run") == Placement(cgi, "/cgi/run", True)
    assert where.place(b"/srv/site/cgi") == Placement(cgi, "/cgi", True)
    assert where.place(b"/srv/site/caf\xe9.php") == Placement(site_php, "/caf\udce9.php", True)
    assert WebRoots([]).place(b"/srv/site/a.php") is None
    assert WebRoots([site]).place(b"relative/a.php") is None


@pytest.mark.parametrize(
    ("pattern", "exts"),
    [
        (r"\.php$", ("php",)),
        (r"\.(php|phtml|php5)$", ("php", "php5", "phtml")),
        (r"\.ph(p|tml)$", ("php", "phtml")),
        (r".+\.ph(?:ar|p|tml)$", ("phar", "php", "phtml")),
        (r"[^/]\.php(/|$)", ("php",)),
        (r"^(.+\.php)(/.*)$", ("php",)),
        (r"\.php$|\.PHTML$", ("php", "phtml")),
        (r"(?i)\.cgi$", ("cgi",)),
        (r"\.php", ("php",)),
        (r"^/(.*\.php(/.*)?)$", ("php",)),
        (r"^/index\.php(/|$)", None),
        (r"/\.php$", None),
        (r"\.php\d?$", None),
        (r"^/cgi-bin/.*\.pl$", None),
        (r"/\.ht", None),
    ],
)
def test_regex_extensions(pattern: str, exts: Optional[tuple[str, ...]]) -> None:
    assert webroots._regex_exts(pattern) == exts


def test_this_machines_nginx() -> None:
    if not os.path.exists("/etc/nginx/nginx.conf"):
        pytest.skip("nginx is not installed here")
    roots, _problems = discover("/etc/nginx/nginx.conf", ())
    assert b"/var/www/html" in {r.root for r in roots}
