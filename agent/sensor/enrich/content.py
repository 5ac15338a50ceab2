"""Web-shell traits of a candidate file, read from its first bytes.

``ContentScanner.scan(path)`` names the traits found (a sorted tuple, empty
when none) or says None when the file was not scanned. Traits are hints for
the alert, not verdicts. A file costs a few passes of precompiled ``re`` over
its lowercased bytes, each starting at a literal so sre skips ahead in C, and
none can backtrack far; calls are found once ("(" then the name, on the
reversed bytes) and told apart in Python, at most MAX_CALLS a file. A call's
argument is what follows its "(" within WINDOW bytes and before a ";".

Bounds: only regular files of at most ``max_bytes``, opened without following
a symlink and never blocking (a fifo is refused before it is opened); at most
``read_bytes`` read from the start; at most ``files_per_s`` files a second of
``clock``. YARA rules (``*.yar``/``*.yara`` in ``yara_rules_dir``, when the
``yara`` bindings import) are compiled once and again when a rule file
changes, looked at every YARA_CHECK_S; a rule that does not compile or a
match that fails gives no YARA traits and a warning, never an exception.
"""

from __future__ import annotations

import bisect
import errno
import importlib
import logging
import os
import re
import stat
import time
from typing import Any, Callable, Optional

from agent.sensor import longpath

log = logging.getLogger("rarewrite.enrich")

YARA_CHECK_S = 30.0
YARA_TIMEOUT_S = 1
WINDOW = 200  # bytes after a call's "(" that still count as its argument
CODE_EXTS = frozenset(
    b"php php3 php4 php5 php7 php8 phtml phar pht phps inc jsp jspx asp aspx ashx cgi pl py rb sh".split()
)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR)

# Which calls run commands, evaluate code or decode is decided per call from
# its whole name and what stands before it (a method, a definition).
_EXEC_NAMES = frozenset(b"system shell_exec passthru exec popen proc_open pcntl_exec processbuilder".split())
_EVAL_NAMES = frozenset(b"eval assert create_function".split())
_DECODER_NAMES = frozenset(
    b"base64_decode gzinflate gzuncompress gzdecode str_rot13 hex2bin convert_uudecode".split()
)
_OS_CALLS = frozenset(
    b"system popen execl execle execlp execlpe execv execve execvp execvpe"
    b" spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe".split()
)
_SUBPROCESS_CALLS = frozenset(b"popen call run check_output check_call getoutput getstatusoutput".split())
_CALL_NAMES = sorted(
    _EXEC_NAMES | _EVAL_NAMES | _DECODER_NAMES | _OS_CALLS | _SUBPROCESS_CALLS | {b"preg_replace"},
    key=len,
    reverse=True,
)
# On the reversed bytes a call is "(", spaces, then its name backwards: the
# rare "(" is the literal sre looks for, and the name is read whole.
_CALLS_REVERSED = re.compile(
    rb"\(\s*((?:" + b"|".join(re.escape(n[::-1]) for n in _CALL_NAMES) + rb")[a-z0-9_]*)"
)
_TRAILING_NAME = re.compile(rb"(?<![a-z0-9_])[a-z0-9_]+\Z")
# "system (" counts only before a variable, a string or a call: prose says "system (OS)"
_ARGUMENT = re.compile(rb"\s*(?:[$'\"@(]|[a-z_][a-z0-9_]*\s*\()")
_SPACES = re.compile(rb"\s*")
_MODIFIERS = re.compile(rb"[a-z]*")
_CLOSING = {ord("("): ord(")"), ord("["): ord("]"), ord("{"): ord("}"), ord("<"): ord(">")}
_SUPERGLOBAL = re.compile(rb"\$_(?:post|get|request|cookie)\b|\$_server\s*\[\s*['\"]http_")
_REQUEST_OBJECT = re.compile(  # jsp request.getParameter(, asp Request(, Request.Form[
    rb"request\s*(?:\.\s*(?:getparameter\s*\(|(?:item|form|querystring)\s*[\[(])|[\[(])"
)
_GAP = re.compile(rb"[\s@]*")
_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_$")
_CODE_TAG = re.compile(
    rb"<\?php|<\?=\s|<script\s+language\s*=\s*['\"]?php"
    rb"|<%@\s*(?:page|include|taglib|import|assembly|control|webhandler)\b"
)
# an asp/jsp scriptlet: short, printable and closed on the spot, since a bare
# "<%" turns up a few times in any 256 KiB of compressed image bytes; not
# looked for where "<% %>" are client-side templates (underscore, ejs, docs)
_SCRIPTLET = re.compile(rb"<%[\t\n\r\x20-\x24\x26-\x3b\x3d-\x7e]{1,512}%>")
TEMPLATE_EXTS = frozenset(b"js mjs cjs ts html htm xhtml ejs erb hbs mustache md txt rst pod".split())
_BASE64 = bytes(0x62 if chr(b) in "abcdefghijklmnopqrstuvwxyz0123456789+/" else 0x2E for b in range(256))
# the lookbehind lets a run start only at its first escape: linear, not quadratic
_HEX_ESCAPES = re.compile(rb"\\x(?<!\\x[0-9a-f][0-9a-f]\\x)[0-9a-f][0-9a-f](?:\\x[0-9a-f][0-9a-f]){499}")
MAX_CALLS = 4096  # calls looked at a file: a file of nothing but calls costs a bounded time


def _ext(path: bytes) -> bytes:
    name = path.rpartition(b"/")[2]
    return name.rpartition(b".")[2].lower() if b"." in name else b""


def _code_tag(low: bytes, ext: bytes) -> bool:
    if ext in CODE_EXTS:
        return False
    return _CODE_TAG.search(low) is not None or (
        ext not in TEMPLATE_EXTS and _SCRIPTLET.search(low) is not None
    )


def _skip(pattern: re.Pattern[bytes], low: bytes, at: int) -> int:
    """Where a run of ``pattern`` (one that may match nothing) from ``at`` ends."""
    m = pattern.match(low, at)
    return at if m is None else m.end()


def _preg_e(low: bytes, end: int) -> int:
    """Where the pattern argument of the preg_replace( ending at ``end`` ends
    when it has the /e modifier (its replacement is run as PHP); else -1."""
    at = _skip(_SPACES, low, end)
    if at + 1 >= len(low) or low[at] not in b"'\"" or low[at + 1] in b" \t\r\n\\" or low[at + 1] in _WORD:
        return -1
    quote, opening = low[at], low[at + 1]
    closing = _CLOSING.get(opening, opening)
    j = at + 1
    while True:
        j = low.find(bytes((closing,)), j + 1, at + 302)
        if j < 0:
            return -1
        if low[j - 1] != 0x5C:  # "\/" is an escaped delimiter, not the end
            break
    after = _skip(_MODIFIERS, low, j + 1)
    if b"e" in low[j + 1 : after] and low[after : after + 1] == bytes((quote,)):
        return after + 1
    return -1


def _method_kind(before: bytes, name: bytes) -> Optional[str]:
    """For a call after a "." (``before``): "exec" for os., subprocess. and
    Runtime.getRuntime().exec, "" for other methods (re.exec(), $a.exec()),
    None for no method at all (PHP's "a" . system(...) concatenates)."""
    obj = before.rstrip()[:-1].rstrip()
    if obj.endswith((b"]", b"/")):  # a[k].exec(, /re/.exec(
        return ""
    if obj.endswith(b")"):
        return "exec" if name == b"exec" and b"".join(obj[-40:].split()).endswith(b"getruntime()") else ""
    word = _TRAILING_NAME.search(obj)
    if word is None:
        return None
    shell = (word.group() == b"os" and name in _OS_CALLS) or (
        word.group() == b"subprocess" and name in _SUBPROCESS_CALLS
    )
    return "exec" if shell else ""


def _call_kind(low: bytes, name: bytes, start: int, end: int) -> tuple[str, int]:
    """("exec", "eval", "dec" or "", where its argument starts) for the call
    of ``name`` at ``start``, whose "(" ends at ``end``."""
    if name in _DECODER_NAMES:
        return "dec", end
    before = low[max(0, start - 64) : start]
    if before.rstrip().endswith(b"."):
        method = _method_kind(before, name)
        if method is not None:
            return method, end
    if before.endswith((b"$", b"->", b"::")) or before.rstrip(b" \t\r\n&").endswith((b"function", b"def")):
        return "", end  # $pdo->exec(), $fn(), function exec(): not the builtin
    if name == b"preg_replace":
        pattern_end = _preg_e(low, end)
        return ("eval", pattern_end) if pattern_end >= 0 else ("", end)
    kind = "exec" if name in _EXEC_NAMES else "eval" if name in _EVAL_NAMES else ""
    if kind and end - start - 1 > len(name) and not _ARGUMENT.match(low, end):
        return "", end
    after = _skip(_SPACES, low, end)
    if low[after : after + 1] == b")":
        return "", end  # "exec()" with nothing to run: prose and docs
    return kind, end


def _calls(low: bytes) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Where the arguments of exec and eval calls start, and each decoder call's (start, end)."""
    execs: list[int] = []
    evals: list[int] = []
    decoders: list[tuple[int, int]] = []
    n = len(low)
    for i, m in enumerate(_CALLS_REVERSED.finditer(low[::-1])):
        if i >= MAX_CALLS:
            break
        start, end = n - m.end(1), n - m.start()
        kind, arg = _call_kind(low, m.group(1)[::-1], start, end)
        if kind == "exec":
            execs.append(arg)
        elif kind == "eval":
            evals.append(arg)
        elif kind == "dec":
            decoders.append((start, end))
    return sorted(execs), sorted(evals), decoders


def _requests(low: bytes) -> list[int]:
    out = [m.start() for m in _SUPERGLOBAL.finditer(low)]
    for m in _REQUEST_OBJECT.finditer(low):
        if m.start() == 0 or low[m.start() - 1] not in _WORD:
            out.append(m.start())
    return sorted(out)


def _reaches(low: bytes, calls: list[int], sources: list[int]) -> bool:
    """A source starts within WINDOW bytes after some call's "(", with no ";" between."""
    for end in calls:
        i = bisect.bisect_left(sources, end)
        if i < len(sources) and sources[i] - end <= WINDOW and low.find(b";", end, sources[i]) < 0:
            return True
    return False


def signals(data: bytes, path: bytes) -> set[str]:
    """The traits found in ``data``, read from the start of the file at ``path``."""
    low = data.lower()
    found = set()
    if _code_tag(low, _ext(path)):
        found.add("code_tag_in_non_code_file")
    execs, evals, decoders = _calls(low)
    if execs:
        found.add("exec_call")
    if execs or evals:
        requests = _requests(low)
        if _reaches(low, evals, sorted([s for s, _ in decoders] + requests)):
            found.add("eval_chain")
        if _reaches(low, sorted(execs + evals), requests):
            found.add("request_to_exec")
    starts = {s for s, _ in decoders}
    if any(_skip(_GAP, low, end) in starts for _, end in decoders):
        found.add("decoder_chain")
    if b"b" * 1000 in low.translate(_BASE64) or _HEX_ESCAPES.search(low):
        found.add("long_encoded_blob")  # a plain hex run of 2000 is a base64 run as well
    return found


def _read_head(path: bytes, read_bytes: int, max_bytes: int) -> Optional[bytes]:
    """The first ``read_bytes`` of a regular file of at most ``max_bytes``; None otherwise."""
    try:
        fd = longpath.open_file(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:  # swapped since the lstat
            return None
        parts = []
        left = read_bytes
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)
    except OSError:
        return None
    finally:
        os.close(fd)


class ContentScanner:
    """``scan(path)``: the web-shell traits of the file at ``path`` (sorted
    names, ``yara:<rule>`` for YARA matches), or None when it was not scanned;
    ``skipped`` counts the candidates not scanned by reason (a gone file or one
    that is not a regular file is no candidate and is not counted)."""

    def __init__(
        self,
        max_bytes: int = 1 << 20,
        read_bytes: int = 256 << 10,
        files_per_s: int = 20,
        clock: Callable[[], float] = time.monotonic,
        yara_rules_dir: Optional[str] = None,
        yara: Any = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.read_bytes = read_bytes
        self.files_per_s = files_per_s
        self._clock = clock
        self.skipped = {"too_large": 0, "rate": 0, "unreadable": 0}
        self._second = -1
        self._files = 0
        self._yara_dir = yara_rules_dir
        self._yara = yara
        self._yara_loaded = yara is not None
        self._rules: Any = None
        self._rules_sig: Optional[tuple[tuple[str, int, int], ...]] = None
        self._rules_checked: Optional[float] = None
        self._warned: set[str] = set()

    def scan(self, path: bytes, pre: Optional[longpath.Stat] = None) -> Optional[tuple[str, ...]]:
        """``pre``: the file's lstat already read (None: read it here)."""
        try:
            st = longpath.stat_of(path, pre)
        except OSError as exc:
            if exc.errno not in _GONE:
                self.skipped["unreadable"] += 1
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > self.max_bytes:
            self.skipped["too_large"] += 1
            return None
        if not self._take():
            self.skipped["rate"] += 1
            return None
        data = _read_head(path, self.read_bytes, self.max_bytes)
        if data is None:
            self.skipped["unreadable"] += 1
            return None
        found = signals(data, path)
        found.update(self._yara_signals(data))
        return tuple(sorted(found))

    def _take(self) -> bool:
        now = int(self._clock())
        if now != self._second:
            self._second, self._files = now, 0
        if self._files >= self.files_per_s:
            return False
        self._files += 1
        return True

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _yara_signals(self, data: bytes) -> list[str]:
        rules = self._yara_rules()
        if rules is None:
            return []
        try:
            return [f"yara:{m.rule}" for m in rules.match(data=data, timeout=YARA_TIMEOUT_S)]
        except Exception as exc:  # noqa: BLE001 - a failed match (timeout, odd rule) is no trait
            self._warn("yara-match", f"yara match failed: {exc}")
            return []

    def _yara_module(self) -> Any:
        if not self._yara_loaded:
            self._yara_loaded = True
            try:
                self._yara = importlib.import_module("yara")
            except Exception as exc:  # noqa: BLE001 - python3-yara is optional
                self._warn("yara-import", f"yara rules configured but the yara module is unusable: {exc}")
        return self._yara

    def _yara_rules(self) -> Any:
        if self._yara_dir is None:
            return None
        now = self._clock()
        if self._rules_checked is not None and now - self._rules_checked < YARA_CHECK_S:
            return self._rules
        self._rules_checked = now
        yara = self._yara_module()
        if yara is None:
            return None
        sig = self._rule_files(self._yara_dir)
        if sig != self._rules_sig:
            self._rules_sig = sig
            self._rules = self._compile(yara, self._yara_dir, sig)
        return self._rules

    def _rule_files(self, rules_dir: str) -> tuple[tuple[str, int, int], ...]:
        """(name, mtime, size) of each rule file: a change in any means a recompile."""
        out = []
        try:
            with os.scandir(rules_dir) as it:
                for e in it:
                    if e.name.endswith((".yar", ".yara")) and e.is_file():
                        st = e.stat()
                        out.append((e.name, st.st_mtime_ns, st.st_size))
        except OSError as exc:
            self._warn("yara-dir", f"yara rules directory {rules_dir!r} unreadable: {exc}")
        return tuple(sorted(out))

    @staticmethod
    def _compile(yara: Any, rules_dir: str, files: tuple[tuple[str, int, int], ...]) -> Any:
        if not files:
            return None
        paths = {name: os.path.join(rules_dir, name) for name, _, _ in files}
        try:
            return yara.compile(filepaths=paths)
        except Exception as exc:  # noqa: BLE001 - a bad rule file must not stop the scanner
            log.warning("yara rules in %r do not compile, none used until they change: %s", rules_dir, exc)
            return None
