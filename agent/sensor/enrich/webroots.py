"""Web roots: where the installed web servers serve files from, and which of
those files a request would hand to an interpreter.

``discover()`` reads nginx's and Apache's own config files, includes
followed as the servers follow them, and returns one ``WebRoot`` per
document root or alias: the extensions the server executes there, the
access logs of that server block or vhost, and its names.
``WebRoots.place()`` then says, for a created file, which root serves it, at
what URL, and whether requesting it would run it. ``configured()`` reads an
admin's ``web_roots`` entry for servers this module cannot read.

Limits (this reads config text; it does not run the server):

- every conditional section counts as active: Apache's ``<IfModule>``,
  ``<IfDefine>``, ``<IfVersion>``, negated ones too; nginx ``if`` blocks are
  not entered;
- handlers are per server block or vhost: a php handler set in one Apache
  ``<Directory>`` or nginx location counts for every root of that vhost or
  server, so an "uploads run no php" exception is not seen; ``AddHandler
  cgi-script`` counts whether ``Options ExecCGI`` is on or not;
- extensions come from simple regexes only (see ``_regex_exts``); any other
  pattern on an interpreting location or FilesMatch is reported as a
  problem, never guessed;
- not followed: variables in nginx root, alias and access_log paths; alias
  in a regex location; Apache AliasMatch, ScriptAliasMatch, UserDir, piped
  logs; a prefix location that passes everything to FastCGI; nginx's
  *_by_lua_block bodies are read as nginx syntax (an odd one is a problem);
- ``executable == ("*",)`` (Apache ScriptAlias) means every file in that
  root is run as a program whatever its name: ``Placement.executable`` is
  then True for every file there.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from typing import Callable, NamedTuple, Optional, Union

EVERYTHING = "*"  # in WebRoot.executable: any file there is executed
MAX_FILE_BYTES = 1 << 20
MAX_INCLUDE_DEPTH = 16
MAX_FILES = 4000  # per server: a glob over a huge directory must not stall the agent's start
MAX_NESTING = 64
NGINX_PREFIX = "/usr/share/nginx"  # Debian's and Fedora's --prefix: where relative root and log paths point
NGINX_DEFAULT_LOG = ("/var/log/nginx/access.log", "combined")
APACHE_DEFAULT_VARS = {"APACHE_LOG_DIR": "/var/log/apache2"}
CLF = '%h %l %u %t "%r" %>s %b'  # TransferLog's format when no default LogFormat is read

Logs = tuple[tuple[str, str], ...]


class WebRoot(NamedTuple):
    """A directory a web server serves files from."""

    server: str  # "nginx", "apache" or "config" (admin-configured)
    root: bytes  # absolute, normalised, no trailing slash (except "/")
    url_prefix: str  # the URL path the root is served at: "/" for `root`, the location for an alias
    executable: tuple[str, ...]  # lower-case extensions handed to an interpreter there; ("*",): every file
    access_logs: Logs  # (log path, format string or format name); () when unknown
    names: tuple[str, ...]  # server_name / ServerName+ServerAlias, for the reader


class Placement(NamedTuple):
    """Where a file sits among the web roots."""

    root: WebRoot
    url: str  # the URL path that would serve the file (not percent-encoded)
    executable: bool  # its extension is in root.executable (always, for "*")


class _ConfigError(Exception):
    def __init__(self, msg: str, line: int = 0) -> None:
        super().__init__(msg)
        self.msg = msg
        self.line = line


class _Node:
    """One directive or section, as written (includes already spliced in)."""

    __slots__ = ("args", "block", "line", "name", "path")

    def __init__(
        self, name: str, args: tuple[str, ...], block: Optional[list[_Node]], path: str, line: int
    ) -> None:
        self.name = name
        self.args = args
        self.block = block
        self.path = path
        self.line = line


# ----------------------------------------------------------------- the public API


def discover(
    nginx_conf: Optional[str] = "/etc/nginx/nginx.conf",
    apache_confs: Sequence[str] = ("/etc/apache2/apache2.conf", "/etc/httpd/conf/httpd.conf"),
) -> tuple[list[WebRoot], list[str]]:
    """The web roots the installed servers' config files declare, and the
    problems met (unreadable includes, parse errors: each a one-line string;
    never raises). A missing main config file is a server not installed:
    no roots, no problem."""
    roots: list[WebRoot] = []
    problems: list[str] = []
    todo: list[tuple[str, str, Callable[[str], tuple[list[WebRoot], list[str]]]]] = []
    if nginx_conf:
        todo.append(("nginx", nginx_conf, _discover_nginx))
    todo.extend(("apache", conf, _discover_apache) for conf in apache_confs)
    for server, conf, read in todo:
        if not os.path.lexists(conf):
            continue
        try:
            found, said = read(conf)
        except Exception as e:  # noqa: BLE001 - a config this parser cannot take must not stop the agent
            problems.append(f"{server}: {conf}: not read: {type(e).__name__}: {e}")
            continue
        roots.extend(found)
        problems.extend(said)
    return _merge(roots), list(dict.fromkeys(problems))


DIR_CACHE = 4096  # directories whose root WebRoots.place remembers


class WebRoots:
    """The roots to place files in; ``place`` costs one dict look-up per
    directory level of the path, not one per root."""

    def __init__(self, roots: Sequence[WebRoot]) -> None:
        self.roots: tuple[WebRoot, ...] = tuple(roots)
        self._by_root: dict[bytes, list[WebRoot]] = {}
        for r in self.roots:
            self._by_root.setdefault(_norm(r.root), []).append(r)
        # directory -> the deepest root at or above it (None: none): the roots never change
        # here, and a burst's files share few directories, so a file costs one look-up
        self._dirs: dict[bytes, Optional[bytes]] = {}

    def __len__(self) -> int:
        return len(self.roots)

    def place(self, path: bytes) -> Optional[Placement]:
        """The deepest root containing ``path`` (component-wise:
        /var/www/html2 is not under /var/www/html), or None. Of several
        roots at the same directory, the first that executes the file."""
        path = _norm(path)
        here = self._by_root.get(path)
        if here:
            return _placement(here, path, path)
        parent = os.path.dirname(path)
        if parent == path:
            return None
        if parent not in self._dirs:
            if len(self._dirs) >= DIR_CACHE:
                self._dirs.clear()
            self._dirs[parent] = self._root_at_or_above(parent)
        root = self._dirs[parent]
        return _placement(self._by_root[root], path, root) if root is not None else None

    def _root_at_or_above(self, directory: bytes) -> Optional[bytes]:
        probe = directory
        while True:
            if self._by_root.get(probe):
                return probe
            parent = os.path.dirname(probe)
            if parent == probe:
                return None
            probe = parent


def configured(spec: str) -> Optional[WebRoot]:
    """An admin's ``web_roots`` entry, e.g. "/srv/site:php,phtml" or
    "/srv/static" (no executable extensions) or "/srv/app:php@/app" (served
    at URL prefix /app); "*" as an extension: every file there is executed.
    None if malformed (the caller reports it as a config error)."""
    path, url = spec.strip(), "/"
    head, at, tail = path.rpartition("@")
    if at and tail.startswith("/"):
        path, url = head, tail
        if any(c.isspace() for c in url):
            return None
    exts: list[str] = []
    head, colon, tail = path.rpartition(":")
    if colon:
        path = head
        exts = [e.strip().lstrip(".").lower() for e in tail.split(",")]
        if not all(_EXT_WORD.fullmatch(e) for e in exts):
            return None
    if not path.startswith("/") or "\0" in path:
        return None
    return WebRoot("config", _norm(os.fsencode(path)), url, tuple(sorted(set(exts))), (), ())


_EXT_WORD = re.compile(r"[a-z0-9_+-]+|\*")


def _placement(candidates: list[WebRoot], path: bytes, root: bytes) -> Placement:
    rel = path[len(root) :].lstrip(b"/")
    name = os.path.basename(path)
    ext = name.rpartition(b".")[2].decode("utf-8", "surrogateescape").lower() if b"." in name else ""
    placed = [
        Placement(
            r, _url(r.url_prefix, rel), EVERYTHING in r.executable or (bool(ext) and ext in r.executable)
        )
        for r in candidates
    ]
    return next((p for p in placed if p.executable), placed[0])


def _url(prefix: str, rel: bytes) -> str:
    if not rel:
        return prefix
    return (prefix if prefix.endswith("/") else prefix + "/") + rel.decode("utf-8", "surrogateescape")


def _norm(path: bytes) -> bytes:
    p = os.path.normpath(path)
    return b"/" + p.lstrip(b"/") if p.startswith(b"//") else p  # POSIX keeps a leading "//"


def _web_root(
    server: str, path: str, url: str, exts: tuple[str, ...], logs: Logs, names: tuple[str, ...]
) -> WebRoot:
    return WebRoot(server, _norm(os.fsencode(path)), url, exts, logs, names)


def _merge(roots: Iterable[WebRoot]) -> list[WebRoot]:
    """One WebRoot per (server, root, url_prefix): vhosts sharing a root pool
    their extensions, logs and names."""
    merged: dict[tuple[str, bytes, str], WebRoot] = {}
    for r in roots:
        key = (r.server, r.root, r.url_prefix)
        old = merged.get(key)
        merged[key] = (
            r
            if old is None
            else r._replace(
                executable=tuple(sorted({*old.executable, *r.executable})),
                access_logs=tuple(dict.fromkeys(old.access_logs + r.access_logs)),
                names=tuple(dict.fromkeys(old.names + r.names)),
            )
        )
    return list(merged.values())


# ----------------------------------------------------- extensions from a regex

# The forms understood, with optional (?i) and ^ in front and the name part
# wrapped in a group or not: \.php$  \.(php|phtml|php5)$  \.ph(p|tml)$
# \.ph(?:ar|p|tml)$  .+\.php$  [^/]\.php(/|$)  ^(.+\.php)(/.*)$  \.php
# ^/(.*\.php(/.*)?)$ (ProxyPassMatch) and top-level alternatives of these
# (\.php$|\.phtml$). A fixed name or directory before the dot (^/index\.php)
# is not one of them: the extension alone would say too much.
_RE_EXT = re.compile(
    r"""(?:\(\?i\))? \^? (?: /?\( )?
        (?: \.[*+]\?? | \[\^/\][*+]? )?
        \\\. (?P<head>[\w-]*) (?: \( (?:\?:)? (?P<alts>[\w-]*(?:\|[\w-]*)+|[\w-]+) \) )? (?P<tail>[\w-]*)
        \)?
        (?: \( (?:\?:)? (?: /\|\$ | \$\|/ | /\.[*+] | \.[*+] ) \) \?? )?
        \)? \$?
    """,
    re.X,
)


def _regex_exts(pattern: str) -> Optional[tuple[str, ...]]:
    """The extensions a file-matching regex selects, or None when the
    pattern is not one of the simple forms above."""
    exts: set[str] = set()
    for branch in _alternatives(pattern):
        m = _RE_EXT.fullmatch(branch)
        if m is None:
            return None
        for alt in (m["alts"] or "").split("|"):
            ext = (m["head"] + alt + m["tail"]).lower()
            if ext:
                exts.add(ext)
    return tuple(sorted(exts)) or None


def _alternatives(pattern: str) -> list[str]:
    out: list[str] = []
    depth = start = i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
        i += 1
    out.append(pattern[start:])
    return out


# ------------------------------------------------------- reading config files

_GLOB = re.compile(r"[*?[]")


def _read_small(path: str) -> bytes:
    """The file's bytes; ValueError when it is not a regular file or too big
    (O_NONBLOCK: a FIFO dropped into conf.d must not hang the agent)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        chunks: list[bytes] = []
        total = 0
        while total <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > MAX_FILE_BYTES:
        raise ValueError("larger than 1 MiB")
    return b"".join(chunks)


class _Reader:
    """One server's config files read into _Nodes, includes spliced in place,
    with the guards a broken or hostile tree needs: loops, depth, size,
    number of files."""

    server = ""
    EMPTY_GLOB_OK = True  # nginx: an include glob matching nothing is fine
    DIRS = False  # Apache: including a directory includes the files in it

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._open: list[str] = []  # real paths of the files being read, outermost first
        self._reads = 0

    def problem(self, path: str, line: int, msg: str) -> None:
        where = f"{path}: line {line}" if line else path
        self.problems.append(f"{self.server}: {where}: {msg}")

    def parse(self, path: str, text: str) -> list[_Node]:
        raise NotImplementedError

    def text(self, path: str, at: Optional[tuple[str, int]] = None) -> Optional[str]:
        where, line = at or (path, 0)
        self._reads += 1
        if self._reads > MAX_FILES:
            if self._reads == MAX_FILES + 1:
                self.problem(where, line, f"more than {MAX_FILES} files; {path} and later ones not read")
            return None
        try:
            data = _read_small(path)
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self.problem(where, line, f"cannot read {path}: {reason}" if at else f"cannot read: {reason}")
            return None
        return data.decode("utf-8", "surrogateescape")

    def read(self, path: str, at: Optional[tuple[str, int]] = None) -> list[_Node]:
        where, line = at or (path, 0)
        real = os.path.realpath(path)
        if real in self._open:
            self.problem(where, line, f"include loop: {path} is already being read")
            return []
        if len(self._open) > MAX_INCLUDE_DEPTH:
            self.problem(where, line, f"includes nested deeper than {MAX_INCLUDE_DEPTH}: {path} not read")
            return []
        text = self.text(path, at)
        if text is None:
            return []
        self._open.append(real)
        try:
            return self.parse(path, text)
        finally:
            self._open.pop()

    def include(self, pattern: str, base: str, optional: bool, path: str, line: int) -> list[_Node]:
        full = os.path.join(base, pattern)
        if _GLOB.search(full):
            files = sorted(f for f in glob.glob(full) if not os.path.isdir(f))
            if not files and not (optional or self.EMPTY_GLOB_OK):
                self.problem(path, line, f"include {pattern}: no file matches")
        elif self.DIRS and os.path.isdir(full):
            files = self._dir_files(full, path, line)
        elif optional and not os.path.lexists(full):
            files = []
        else:
            files = [full]
        out: list[_Node] = []
        for name in files:
            out.extend(self.read(name, (path, line)))
        return out

    def _dir_files(self, directory: str, path: str, line: int) -> list[str]:
        try:
            names = sorted(os.listdir(directory))
        except OSError as e:
            self.problem(path, line, f"cannot list {directory}: {e.strerror}")
            return []
        return [p for p in (os.path.join(directory, n) for n in names) if not os.path.isdir(p)]


# ---------------------------------------------------------------------- nginx

# ngx_conf_read_token's rules: '#' starts a comment only where a token could
# start; a word ends at blank, ';' or '{' (not at '}', and "${" stays in it);
# a quoted string must be followed by a blank, ';', '{' or ')'.
_NGX_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<comment>\#[^\n]*)
      | (?P<punct>[;{}])
      | "(?P<dq>(?:[^"\\]|\\.)*)"
      | '(?P<sq>(?:[^'\\]|\\.)*)'
      | (?P<word>(?:\\.|\$\{|[^\s;{\\"'])(?:\\.|\$\{|[^\s;{\\])*)""",
    re.X | re.S,
)
_NGX_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", '"': '"', "'": "'", "\\": "\\"}
_NGX_PASS = frozenset(("fastcgi_pass", "uwsgi_pass", "scgi_pass"))


def _ngx_unescape(s: str) -> str:
    if "\\" not in s:
        return s
    return re.sub(r"\\(.)", lambda m: _NGX_ESCAPES.get(m.group(1), m.group(0)), s, flags=re.S)


def _nginx_tokens(text: str) -> Iterator[tuple[str, str, int]]:
    """(kind, text, line): kind "word" or one of ; { }."""
    pos, line, end = 0, 1, len(text)
    while pos < end:
        m = _NGX_TOKEN.match(text, pos)
        if m is None:
            what = "unterminated quoted string" if text[pos] in "\"'" else f"unexpected {text[pos]!r}"
            raise _ConfigError(what, line)
        kind = m.lastgroup or ""
        if kind in ("dq", "sq", "word"):
            yield "word", _ngx_unescape(m.group(kind)), line
            if kind != "word" and m.end() < end and text[m.end()] not in " \t\r\n;{)":
                raise _ConfigError(f"unexpected {text[m.end()]!r} after a quoted string", line)
        elif kind == "punct":
            yield m.group(), m.group(), line
        line += m.group().count("\n")
        pos = m.end()


class _NginxReader(_Reader):
    server = "nginx"

    def __init__(self, conf_prefix: str) -> None:
        super().__init__()
        self.conf_prefix = conf_prefix

    def parse(self, path: str, text: str) -> list[_Node]:
        """Stops at the first syntax error, as nginx does, keeping what came before."""
        top: list[_Node] = []
        stack = [top]
        words: list[str] = []
        start = 0
        try:
            for kind, value, line in _nginx_tokens(text):
                if kind == "word":
                    start = start if words else line
                    words.append(value)
                elif kind == "}":
                    if words or len(stack) == 1:
                        raise _ConfigError("unexpected '}'", line)
                    stack.pop()
                elif not words:
                    raise _ConfigError(f"unexpected '{kind}'", line)
                elif kind == "{":
                    if len(stack) > MAX_NESTING:
                        raise _ConfigError("blocks nested too deep", line)
                    block: list[_Node] = []
                    stack[-1].append(_Node(words[0], tuple(words[1:]), block, path, start))
                    stack.append(block)
                    words = []
                else:
                    stack[-1].extend(self._directive(words, path, start))
                    words = []
            end = text.count("\n") + 1
            if words:
                raise _ConfigError("unexpected end of file, expecting ';' or '}'", end)
            if len(stack) > 1:
                raise _ConfigError("unexpected end of file, expecting '}'", end)
        except _ConfigError as e:
            self.problem(path, e.line, e.msg)
        return top

    def _directive(self, words: list[str], path: str, line: int) -> list[_Node]:
        if words[0] != "include":
            return [_Node(words[0], tuple(words[1:]), None, path, line)]
        if len(words) != 2:
            self.problem(path, line, "include takes one file name")
            return []
        return self.include(words[1], self.conf_prefix, False, path, line)


def _discover_nginx(conf: str) -> tuple[list[WebRoot], list[str]]:
    reader = _NginxReader(os.path.dirname(conf))
    tree = reader.read(conf)
    roots: list[WebRoot] = []
    for http in _blocks(tree, "http"):
        block = http.block or []
        formats = _ngx_formats(block)
        logs = _ngx_logs(block, (NGINX_DEFAULT_LOG,), formats, reader)
        root = _ngx_path(_last(block, "root"), reader)
        for server in _blocks(block, "server"):
            roots.extend(_ngx_server(server.block or [], root, logs, formats, reader))
    return roots, reader.problems


def _blocks(nodes: list[_Node], name: str) -> list[_Node]:
    return [n for n in nodes if n.name == name and n.block is not None]


def _last(nodes: list[_Node], name: str) -> Optional[_Node]:
    found = [n for n in nodes if n.name == name and n.block is None and n.args]
    return found[-1] if found else None


def _ngx_formats(block: list[_Node]) -> dict[str, str]:
    formats = {}
    for n in block:
        if n.name == "log_format" and n.block is None and len(n.args) >= 2:
            pieces = n.args[1:]
            if pieces[0].startswith("escape="):
                pieces = pieces[1:]
            formats[n.args[0]] = "".join(pieces)
        # "combined" cannot be redefined in nginx: it stays a name here
    return formats


def _ngx_logs(block: list[_Node], inherited: Logs, formats: dict[str, str], reader: _Reader) -> Logs:
    """This level's access logs: its own access_log directives replace all
    the inherited ones, and `access_log off` among them means none."""
    here = [n for n in block if n.name == "access_log" and n.block is None and n.args]
    if not here:
        return inherited
    if any(n.args[0] == "off" for n in here):
        return ()
    out = []
    for n in here:
        path = n.args[0]
        if path.startswith("syslog:"):
            continue
        if "$" in path:
            reader.problem(n.path, n.line, f"access_log {path}: a path with variables is not followed")
            continue
        fmt = n.args[1] if len(n.args) > 1 else "combined"
        out.append((os.path.join(NGINX_PREFIX, path), formats.get(fmt, fmt)))
    return tuple(out)


def _ngx_path(node: Optional[_Node], reader: _Reader) -> Optional[str]:
    if node is None:
        return None
    if "$" in node.args[0]:
        msg = f"{node.name} {node.args[0]}: a path with variables is not followed"
        reader.problem(node.path, node.line, msg)
        return None
    return os.path.join(NGINX_PREFIX, node.args[0])


def _ngx_location(args: tuple[str, ...]) -> tuple[str, str]:
    """(modifier, uri or regex) of a location's arguments; "=/x", "~\\.php$"
    and "~*..." may be written glued, as nginx allows."""
    if len(args) == 2:
        return args[0], args[1]
    if len(args) != 1:
        return "", ""
    for mod in ("~*", "~", "="):
        if args[0].startswith(mod):
            return mod, args[0][len(mod) :]
    return "", args[0]


def _ngx_server(
    block: list[_Node], http_root: Optional[str], http_logs: Logs, formats: dict[str, str], reader: _Reader
) -> list[WebRoot]:
    names = tuple(a for n in block if n.name == "server_name" and n.block is None for a in n.args)
    logs = _ngx_logs(block, http_logs, formats, reader)
    found: list[tuple[str, str, Logs]] = []  # (directory, url prefix, access logs)
    root = _ngx_path(_last(block, "root"), reader) or http_root
    if root:
        found.append((root, "/", logs))
    exts: set[str] = set()
    todo = [(n, logs) for n in reversed(_blocks(block, "location"))]
    while todo:
        loc, outer_logs = todo.pop()
        inner = loc.block or []
        loc_logs = _ngx_logs(inner, outer_logs, formats, reader)
        _ngx_location_roots(loc, inner, loc_logs, reader, found)
        mod, pattern = _ngx_location(loc.args)
        if mod in ("~", "~*") and any(n.name in _NGX_PASS for n in inner):
            got = _regex_exts(pattern)
            if got is None:
                msg = f"cannot tell which extensions location {pattern} executes"
                reader.problem(loc.path, loc.line, msg)
            exts.update(got or ())
        todo.extend((n, loc_logs) for n in reversed(_blocks(inner, "location")))
    ext_t = tuple(sorted(exts))
    return [_web_root("nginx", d, url, ext_t, lg, names) for d, url, lg in found]


def _ngx_location_roots(
    loc: _Node, inner: list[_Node], logs: Logs, reader: _Reader, found: list[tuple[str, str, Logs]]
) -> None:
    mod, uri = _ngx_location(loc.args)
    root = _ngx_path(_last(inner, "root"), reader)
    if root:
        found.append((root, "/", logs))  # root semantics: the file is root + the whole URI
    alias = _last(inner, "alias")
    if alias is None:
        return
    if mod in ("~", "~*") or not uri.startswith("/"):
        reader.problem(alias.path, alias.line, f"alias in location {uri} is not followed")
        return
    path = _ngx_path(alias, reader)
    if path:
        found.append((path, uri, logs))


# --------------------------------------------------------------------- Apache

_AP_WORD = re.compile(r'"((?:[^"\\]|\\.)*)"|\'((?:[^\'\\]|\\.)*)\'|(\S+)', re.S)
_AP_VAR = re.compile(r"\$\{(\w+)\}")
_AP_RUNS = re.compile(
    r"cgi-script|fcgid-script|php\d*-script|perl-script|application/x-httpd-php\d*|proxy:.*(fcgi|scgi|uwsgi)://.*",
    re.I,
)  # application/x-httpd-php-source shows the code; it does not run it
_AP_PHP_TYPE = re.compile(r"application/x-httpd-php\d*", re.I)
_SH_EXPORT = re.compile(r"\s*export\s+(\w+)=(.*)")
_SH_VAR = re.compile(r"\$\{?(\w+)\}?")


def _apache_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, logical line): a backslash ending a line joins
    the next one on, as ap_cfg_getline does."""
    held, start = "", 0
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        start = start or n
        if line.endswith("\\"):
            held += line[:-1]
            continue
        yield start, held + line
        held, start = "", 0
    if held:
        yield start, held


def _apache_words(text: str) -> list[str]:
    out = []
    for m in _AP_WORD.finditer(text):
        dq, sq, bare = m.groups()
        if dq is not None:
            out.append(dq.replace('\\"', '"'))
        elif sq is not None:
            out.append(sq.replace("\\'", "'"))
        else:
            out.append(bare)
    return out


def _envvars(text: str) -> dict[str, str]:
    """Debian's /etc/apache2/envvars `export NAME=value` lines; an unset
    shell variable in a value ($SUFFIX) reads as empty, as sh has it."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _SH_EXPORT.fullmatch(line)
        if m is None:
            continue
        value = m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[m.group(1)] = _SH_VAR.sub(lambda v: out.get(v.group(1), ""), value)
    return out


class _ApacheReader(_Reader):
    server = "apache"
    EMPTY_GLOB_OK = False
    DIRS = True

    def __init__(self, server_root: str) -> None:
        super().__init__()
        self.server_root = server_root
        self.vars = dict(APACHE_DEFAULT_VARS)  # Define and envvars, for ${NAME}

    def parse(self, path: str, text: str) -> list[_Node]:
        """Stops at the first error in a file, keeping what came before."""
        top: list[_Node] = []
        stack = [(_Node("", (), top, path, 0), top)]  # (section, its block): the file itself outermost
        n = 0
        try:
            for n, line in _apache_lines(text):
                self._line(line, path, n, stack)
        except _ConfigError as e:
            self.problem(path, n, e.msg)
            return top
        if len(stack) > 1:
            open_section = stack[-1][0]
            self.problem(
                path, open_section.line, f"<{open_section.name}> is not closed at the end of the file"
            )
        return top

    def _line(self, line: str, path: str, n: int, stack: list[tuple[_Node, list[_Node]]]) -> None:
        line = line.strip()
        if not line or line.startswith("#"):
            return
        line = _AP_VAR.sub(lambda m: self.vars.get(m.group(1), m.group(0)), line)
        if line.startswith("</"):
            name = line[2:].rstrip(">").strip().lower()
            if len(stack) == 1 or stack[-1][0].name != name:
                raise _ConfigError(f"</{name}> without a matching <{name}>")
            stack.pop()
            return
        if line.startswith("<"):
            words = _apache_words(line[1:-1]) if line.endswith(">") else []
            if not words:
                raise _ConfigError(f"{line.split()[0]} section is missing its closing '>'")
            if len(stack) > MAX_NESTING:
                raise _ConfigError("sections nested too deep")
            block: list[_Node] = []
            stack[-1][1].append(_Node(words[0].lower(), tuple(words[1:]), block, path, n))
            stack.append((stack[-1][1][-1], block))
            return
        words = _apache_words(line)
        name, args = words[0].lower(), tuple(words[1:])
        if name in ("include", "includeoptional"):
            for arg in args:
                stack[-1][1].extend(self.include(arg, self.server_root, name == "includeoptional", path, n))
            return
        if name == "define" and args:
            self.vars[args[0]] = args[1] if len(args) > 1 else ""
        elif name == "serverroot" and args:
            self.server_root = args[0]
        stack[-1][1].append(_Node(name, args, None, path, n))


class _Host:
    """What one vhost (or the main server) declares."""

    def __init__(self) -> None:
        self.docroot: Optional[str] = None
        self.aliases: list[tuple[str, str, bool]] = []  # (url, directory, every file runs)
        self.logs: list[tuple[str, str]] = []  # (path, nickname or format string)
        self.names: list[str] = []
        self.formats: dict[str, str] = {}
        # (handler, extensions) or (handler, the <Files>/<FilesMatch> it is set in)
        self.handlers: list[tuple[str, Union[tuple[str, ...], _Node]]] = []


def _discover_apache(conf: str) -> tuple[list[WebRoot], list[str]]:
    conf_dir = os.path.dirname(conf)
    # httpd's layout keeps httpd.conf in ServerRoot/conf; Debian's, apache2.conf in ServerRoot
    reader = _ApacheReader(os.path.dirname(conf_dir) if os.path.basename(conf_dir) == "conf" else conf_dir)
    envvars = os.path.join(conf_dir, "envvars")
    if os.path.lexists(envvars):
        reader.vars.update(_envvars(reader.text(envvars) or ""))
    tree = reader.read(conf)
    main = _Host()
    hosts: list[_Host] = []
    actions: set[str] = set()
    _apache_walk(tree, main, hosts, None, actions)
    return _apache_roots(main, hosts, actions, reader), reader.problems


def _apache_walk(
    nodes: list[_Node], host: _Host, hosts: list[_Host], files: Optional[_Node], actions: set[str]
) -> None:
    for node in nodes:
        if node.block is None:
            if not _apache_site(node, host):
                _apache_handler(node, host, files, actions)
        elif node.name == "virtualhost":
            hosts.append(_Host())
            _apache_walk(node.block, hosts[-1], hosts, None, actions)
        else:
            inside = node if node.name in ("files", "filesmatch") else files
            _apache_walk(node.block, host, hosts, inside, actions)


def _apache_site(node: _Node, host: _Host) -> bool:
    """Roots, logs and names; False when the directive is none of those."""
    name, a = node.name, node.args
    if name == "documentroot" and a:
        host.docroot = a[0]
    elif name in ("alias", "scriptalias") and len(a) >= 2:
        host.aliases.append((a[0], a[1], name == "scriptalias"))
    elif name == "customlog" and len(a) >= 2:
        host.logs.append((a[0], a[1]))
    elif name == "transferlog" and a:
        host.logs.append((a[0], CLF))
    elif name == "logformat" and len(a) >= 2:
        host.formats[a[1]] = a[0]
    elif name == "servername" and a:
        host.names.append(a[0])
    elif name == "serveralias":
        host.names.extend(a)
    else:
        return False
    return True


def _apache_handler(node: _Node, host: _Host, files: Optional[_Node], actions: set[str]) -> None:
    name, a = node.name, node.args
    if name == "addhandler" and len(a) >= 2:
        host.handlers.append((a[0], tuple(e.lstrip(".").lower() for e in a[1:])))
    elif name == "addtype" and len(a) >= 2 and _AP_PHP_TYPE.fullmatch(a[0]):
        host.handlers.append((a[0], tuple(e.lstrip(".").lower() for e in a[1:])))
    elif name == "sethandler" and a and files is not None:
        host.handlers.append((a[0], files))
    elif name == "proxypassmatch" and len(a) >= 2 and _AP_RUNS.fullmatch("proxy:" + a[1]):
        host.handlers.append(("proxy:" + a[1], node))  # php-fpm the older way: by URL regex
    elif name == "action" and a:
        actions.add(a[0].lower())  # a handler an Action names runs that CGI on the file


def _handler_exts(host: _Host, actions: set[str], reader: _Reader) -> set[str]:
    out: set[str] = set()
    for handler, source in host.handlers:
        if not (_AP_RUNS.fullmatch(handler) or handler.lower() in actions):
            continue
        if isinstance(source, tuple):
            out.update(source)
            continue
        got = _section_exts(source)
        if got is None:
            what = " ".join((source.name, *source.args))
            what = what if source.block is None else f"<{what}>"
            reader.problem(
                source.path, source.line, f"cannot tell which extensions {what} hands to {handler}"
            )
        out.update(got or ())
    return out


def _section_exts(node: _Node) -> Optional[tuple[str, ...]]:
    a = node.args
    if node.name in ("filesmatch", "proxypassmatch") and a:
        return _regex_exts(a[0])
    if node.name == "files" and len(a) == 2 and a[0] == "~":
        return _regex_exts(a[1])
    m = re.fullmatch(r"\*\.([\w-]+)", a[0]) if node.name == "files" and len(a) == 1 else None
    return (m.group(1).lower(),) if m else None


def _apache_roots(main: _Host, hosts: list[_Host], actions: set[str], reader: _ApacheReader) -> list[WebRoot]:
    """One WebRoot per DocumentRoot and Alias of the main server and each
    vhost; a vhost inherits the main server's DocumentRoot, aliases,
    handlers and (when it has none of its own) logs."""
    everywhere = _handler_exts(main, actions, reader)
    base = reader.server_root
    out: list[WebRoot] = []
    for host in [main, *hosts]:
        inherits = host is not main
        exts = tuple(sorted(everywhere | _handler_exts(host, actions, reader) if inherits else everywhere))
        formats = {**main.formats, **host.formats}
        logs = tuple(  # a piped log ("|rotatelogs ...") is not a file to read
            (os.path.join(base, p), formats.get(f, f)) for p, f in host.logs or main.logs if p[:1] != "|"
        )
        names = tuple(host.names)
        docroot = host.docroot or main.docroot
        if docroot:
            out.append(_web_root("apache", os.path.join(base, docroot), "/", exts, logs, names))
        for url, target, script in host.aliases + (main.aliases if inherits else []):
            run = (EVERYTHING,) if script else exts
            out.append(_web_root("apache", os.path.join(base, target), url, run, logs, names))
    return out
