"""ContentScanner: each web-shell trait on a file that has it and on a benign
look-alike, the bounds (size, file kind, rate) and YARA through a stand-in."""

from __future__ import annotations

import logging
import os
import random
import threading
from pathlib import Path
from typing import Any, Optional

import pytest

from agent.sensor.enrich.content import ContentScanner, signals


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _scan(tmp_path: Path, name: str, data: bytes, **kw: Any) -> Optional[tuple[str, ...]]:
    p = tmp_path / name
    p.write_bytes(data)
    return ContentScanner(**kw).scan(os.fsencode(p))


WORDPRESS_LIKE = b"""<?php
/**
 * The base configuration for WordPress: system information and settings.
 */
function my_system_info( $args ) {
    $info = array( 'php' => phpversion() );
    return $info;
}
class WP_Query_Runner {
    public function exec( $sql ) { return $this->db->query( $sql ); }
}
$pdo->exec( "CREATE TABLE t (a int)" );
$stmt = $db->prepare( 'SELECT 1' ); $stmt->execute();
$ch = curl_init( $url ); curl_exec( $ch );
include ABSPATH . 'wp-settings.php';
$nonce = isset( $_POST['nonce'] ) ? sanitize_text_field( $_POST['nonce'] ) : '';
$data = json_decode( base64_decode( $payload ), true );
echo esc_html( my_system_info( array() )['php'] );
// the operating system (OS) is checked, see system (below) and eval (later)
"""


def test_a_benign_php_file_has_no_trait(tmp_path: Path) -> None:
    assert _scan(tmp_path, "wp-config.php", WORDPRESS_LIKE) == ()


def test_a_jpg_of_binary_bytes_has_no_trait(tmp_path: Path) -> None:
    data = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + random.Random(7).randbytes(200_000) + b"\xff\xd9"
    assert _scan(tmp_path, "photo.jpg", data) == ()


@pytest.mark.parametrize(
    "name,data",
    [
        ("shell.jpg", b"\xff\xd8\xff\xe0 exif <?php echo 1; ?>"),
        ("shell.php.png", b"GIF89a<?PHP phpinfo();"),
        ("x.gif", b"GIF89a<?= $x ?>"),
        ("note.txt", b'<script language="php">echo 1;</script>'),
        ("upload", b"<?php echo 1;"),
        ("cmd.jpg", b'<%@ page import="java.io.*" %>'),
        ("cmd.png", b'\x89PNG<%Runtime.getRuntime().exec(request.getParameter("c"));%>'),
    ],
)
def test_code_tag_in_non_code_file(tmp_path: Path, name: str, data: bytes) -> None:
    assert "code_tag_in_non_code_file" in (_scan(tmp_path, name, data) or ())


@pytest.mark.parametrize("name", ["index.php", "a.PHTML", "page.jsp", "x.aspx", "run.cgi", "tool.py"])
def test_a_code_tag_in_a_code_file_is_no_trait(tmp_path: Path, name: str) -> None:
    assert _scan(tmp_path, name, b"<?php echo 1; <% x %>") == ()


def test_a_bare_percent_tag_is_no_code_tag() -> None:
    assert signals(b"\x00<%\x00\x01 50<% of <%=", b"/a.jpg") == set()


@pytest.mark.parametrize(
    "data",
    [
        b"<?php system($cmd);",
        b"<?php SHELL_EXEC ('ls');",
        b"<?php echo 'a' . passthru($c);",
        b"<?php $h = popen('ls', 'r'); proc_open($c, $d, $p); pcntl_exec('/bin/sh');",
        b"<?php exec ($c);",
        b"<% Runtime.getRuntime().exec(cmd); %>",
        b"import os\nos.system(cmd)\n",
        b"import subprocess\nsubprocess.check_output(['id'])\n",
        b'new ProcessBuilder("sh").start();',
    ],
)
def test_exec_call(data: bytes) -> None:
    assert "exec_call" in signals(data, b"/srv/x.php")


@pytest.mark.parametrize(
    "data",
    [
        b"function my_system_info() {}",
        b"$pdo->exec('x'); Foo::exec('y'); $system('z'); curl_exec($c);",
        b"var m = re.exec(s); fn.call(this); thread.run();",
        b"public function exec() {}",
        b"def exec(self):",
        b"the operating system (OS) runs",
        b"subprocess management in os.path.join(a)",
    ],
)
def test_no_exec_call(data: bytes) -> None:
    assert "exec_call" not in signals(data, b"/srv/x.php")


@pytest.mark.parametrize(
    "data",
    [
        b"<?php eval(base64_decode('ZWNobyAxOw=='));",
        b"<?php @eVaL ( gzinflate(str_rot13($x)) );",
        b"<?php assert($_POST['x']);",
        b"<?php $f = create_function('', hex2bin($h));",
        b"<?php eval(\"?>\" . $_SERVER['HTTP_X_CMD']);",
        b"<?php preg_replace('/.*/e', base64_decode($_GET['x']), '');",
        b"<?php preg_replace(\"#a\\#b#ie\", $_REQUEST['c'], $s);",
    ],
)
def test_eval_chain(data: bytes) -> None:
    assert "eval_chain" in signals(data, b"/srv/x.php")


@pytest.mark.parametrize(
    "data",
    [
        b"<?php eval($code);",
        b"<?php assert($a > 0);\n$b = base64_decode($c);",
        b"<?php preg_replace('/a/i', base64_decode($x), $s);",
        b"<?php $q->eval(base64_decode($x));",
    ],
)
def test_no_eval_chain(data: bytes) -> None:
    assert "eval_chain" not in signals(data, b"/srv/x.php")


@pytest.mark.parametrize(
    "data",
    [
        b"<?php eval(gzinflate(base64_decode('abc')));",
        b"<?php $x = str_rot13( @base64_decode ($y));",
        b"<?php echo gzuncompress(gzinflate($z));",
    ],
)
def test_decoder_chain(data: bytes) -> None:
    assert "decoder_chain" in signals(data, b"/srv/x.php")


def test_one_decoder_is_no_chain() -> None:
    assert "decoder_chain" not in signals(b"<?php $a = base64_decode($b); gzinflate($c);", b"/x.php")


@pytest.mark.parametrize(
    "data",
    [
        b"<?php system($_GET['c']);",
        b"<?php eval($_POST['x']);",
        b"<?php passthru('ls ' . $_COOKIE['d']);",
        b'<% Runtime.getRuntime().exec(request.getParameter("cmd")); %>',
        b'<%@ Page Language="Jscript"%><%eval(Request.Item["pass"],"unsafe");%>',
    ],
)
def test_request_to_exec(data: bytes) -> None:
    assert "request_to_exec" in signals(data, b"/srv/x.php")


def test_a_request_in_another_statement_is_no_flow() -> None:
    found = signals(b"<?php system('uptime');\n$page = $_GET['page'];", b"/srv/x.php")
    assert "exec_call" in found and "request_to_exec" not in found


def test_long_encoded_blob() -> None:
    blob = b"QUJD" * 300
    assert "long_encoded_blob" in signals(b"<?php $x = '" + blob + b"';", b"/x.php")
    assert "long_encoded_blob" in signals(b"$x = '" + b"\\x41" * 500 + b"';", b"/x.php")
    assert "long_encoded_blob" in signals(b"$x = '" + b"0f" * 1000 + b"';", b"/x.php")
    assert "long_encoded_blob" not in signals(b"$x = '" + b"QUJD" * 240 + b"';", b"/x.php")
    assert "long_encoded_blob" not in signals(b"$x = '" + b"\\x41" * 499 + b"';", b"/x.php")
    assert "long_encoded_blob" not in signals((b"word " * 5000), b"/x.txt")


def test_a_web_shell_has_its_traits_sorted(tmp_path: Path) -> None:
    shell = b"GIF89a<?php @eval(gzinflate(base64_decode($_POST['z']))); system($_GET['c']); ?>"
    assert _scan(tmp_path, "avatar.gif", shell) == (
        "code_tag_in_non_code_file",
        "decoder_chain",
        "eval_chain",
        "exec_call",
        "request_to_exec",
    )


def test_only_the_first_bytes_are_read(tmp_path: Path) -> None:
    data = b"a " * 1000 + b"<?php system($_GET['c']);"
    assert _scan(tmp_path, "x.jpg", data, read_bytes=1000) == ()
    assert _scan(tmp_path, "x.jpg", data, read_bytes=4000) != ()


def test_a_file_over_the_size_bound_is_not_scanned(tmp_path: Path) -> None:
    p = tmp_path / "big.jpg"
    p.write_bytes(b"<?php system($_GET['c']);" + b"\0" * 2000)
    scanner = ContentScanner(max_bytes=1000)
    assert scanner.scan(os.fsencode(p)) is None
    assert scanner.skipped == {"too_large": 1, "rate": 0, "unreadable": 0}


def test_a_fifo_is_not_scanned_and_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.php"
    os.mkfifo(fifo)
    scanner = ContentScanner()
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(scanner.scan(os.fsencode(fifo))), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive() and result == [None]


def test_a_symlink_a_directory_and_a_gone_file_are_not_scanned(tmp_path: Path) -> None:
    target = tmp_path / "real.jpg"
    target.write_bytes(b"<?php system($_GET['c']);")
    (tmp_path / "link.jpg").symlink_to(target)
    scanner = ContentScanner()
    assert scanner.scan(os.fsencode(tmp_path / "link.jpg")) is None
    assert scanner.scan(os.fsencode(tmp_path)) is None
    assert scanner.scan(os.fsencode(tmp_path / "gone.jpg")) is None
    assert scanner.skipped == {"too_large": 0, "rate": 0, "unreadable": 0}


def test_an_unreadable_file_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "x.jpg"
    p.write_bytes(b"<?php")
    from agent.sensor import longpath

    def refuse(path: bytes, flags: int) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(longpath, "open_file", refuse)
    scanner = ContentScanner()
    assert scanner.scan(os.fsencode(p)) is None
    assert scanner.skipped["unreadable"] == 1


def test_the_rate_limit(tmp_path: Path) -> None:
    p = tmp_path / "x.php"
    p.write_bytes(b"<?php echo 1;")
    clock = Clock()
    scanner = ContentScanner(files_per_s=3, clock=clock)
    assert [scanner.scan(os.fsencode(p)) for _ in range(5)] == [(), (), (), None, None]
    assert scanner.skipped["rate"] == 2
    clock.t += 1.0
    assert scanner.scan(os.fsencode(p)) == ()


# --- YARA, through a stand-in for python3-yara


class FakeMatch:
    def __init__(self, rule: str) -> None:
        self.rule = rule


class FakeRules:
    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.calls: list[tuple[bytes, Any]] = []

    def match(self, data: bytes, timeout: Any = None) -> list[FakeMatch]:
        self.calls.append((data, timeout))
        return [FakeMatch(n) for n in self.names if n.lower().encode() in data.lower()]


class FakeYara:
    def __init__(self) -> None:
        self.compiled: list[dict[str, str]] = []

    def compile(self, filepaths: dict[str, str]) -> FakeRules:
        self.compiled.append(dict(filepaths))
        names = []
        for path in filepaths.values():
            text = Path(path).read_text()
            if "syntax error" in text:
                raise ValueError(f"{path}(1): syntax error")
            names += text.split()
        return FakeRules(names)


def test_yara_rules_match_and_recompile_on_change(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.yar").write_text("ChinaChopper")
    (rules / "ignored.txt").write_text("Nothing")
    yara, clock = FakeYara(), Clock()
    scanner = ContentScanner(clock=clock, yara_rules_dir=str(rules), yara=yara)
    p = tmp_path / "x.jpg"
    p.write_bytes(b"chinachopper WSO")
    assert scanner.scan(os.fsencode(p)) == ("yara:ChinaChopper",)
    assert yara.compiled == [{"a.yar": str(rules / "a.yar")}]
    (rules / "b.yara").write_text("WSO")
    assert scanner.scan(os.fsencode(p)) == ("yara:ChinaChopper",)  # looked at only every 30 s
    clock.t += 31
    assert scanner.scan(os.fsencode(p)) == ("yara:ChinaChopper", "yara:WSO")
    clock.t += 31
    scanner.scan(os.fsencode(p))
    assert len(yara.compiled) == 2  # nothing changed: not compiled again


def test_a_yara_compile_error_gives_no_yara_traits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yar").write_text("syntax error")
    clock = Clock()
    scanner = ContentScanner(clock=clock, yara_rules_dir=str(rules), yara=FakeYara())
    p = tmp_path / "x.jpg"
    p.write_bytes(b"<?php system($_GET['c']);")
    with caplog.at_level(logging.WARNING, logger="rarewrite.enrich"):
        first = scanner.scan(os.fsencode(p))
        clock.t += 31
        second = scanner.scan(os.fsencode(p))
    assert first == second == ("code_tag_in_non_code_file", "exec_call", "request_to_exec")
    assert len([r for r in caplog.records if "do not compile" in r.getMessage()]) == 1


def test_a_failing_yara_match_gives_no_yara_traits(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.yar").write_text("x")

    class Broken(FakeYara):
        def compile(self, filepaths: dict[str, str]) -> Any:
            class R:
                def match(self, data: bytes, timeout: Any = None) -> Any:
                    raise TimeoutError("yara: timeout")

            return R()

    assert _scan(tmp_path, "a.txt", b"hello", yara_rules_dir=str(rules), yara=Broken()) == ()


def test_no_yara_without_a_rules_dir_or_a_module(tmp_path: Path) -> None:
    assert _scan(tmp_path, "a.txt", b"hello", yara=FakeYara()) == ()
    assert _scan(tmp_path, "b.txt", b"hello", yara_rules_dir=str(tmp_path / "none"), yara=FakeYara()) == ()


@pytest.mark.parametrize(
    "data",
    [
        b"process unless it calls exec() and",
        b"m = matchExpr[ type ].exec( soFar ); /([a-z]+)/.exec(format)",
    ],
)
def test_prose_and_js_methods_are_no_exec_call(data: bytes) -> None:
    assert "exec_call" not in signals(data, b"/srv/doc.html")


def test_a_client_side_template_is_no_code_tag() -> None:
    template = b"var t = _.template('<% _.each(people, function(name) { %><li><%- name %></li><% }); %>');"
    assert signals(template, b"/srv/js/app.js") == set()
    assert "code_tag_in_non_code_file" in signals(template, b"/srv/up/app.jpg")


SYSTEM_PYTHON = "/usr/bin/python3"


def _system_yara() -> bool:
    import subprocess

    if not os.path.exists(SYSTEM_PYTHON):
        return False
    return (
        subprocess.run([SYSTEM_PYTHON, "-c", "import yara"], check=False, capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _system_yara(), reason="Debian's python3-yara is not installed (.ci/run installs it)")
def test_real_yara_rules_through_debians_python3_yara(tmp_path: Path) -> None:
    """The scanner with the system's yara module (the one the packaged agent
    imports), a rules directory, and a file that matches one rule of two."""
    import json
    import subprocess

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "shells.yar").write_text(
        'rule php_shell_exec { strings: $a = "shell_exec(" condition: $a }\n'
        'rule never_here { strings: $a = "no such text anywhere" condition: $a }\n'
    )
    target = tmp_path / "avatar.jpg"
    target.write_bytes(b"\xff\xd8\xff<?php echo shell_exec($_GET['c']); ?>")
    root = Path(__file__).resolve().parents[2]
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from agent.sensor.enrich.content import ContentScanner;"
        "s = ContentScanner(yara_rules_dir=sys.argv[2]);"
        "print(json.dumps(list(s.scan(sys.argv[3].encode()) or ())))"
    )
    out = subprocess.run(
        [SYSTEM_PYTHON, "-c", script, str(root), str(rules), str(target)],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    got = set(json.loads(out.stdout))
    assert "yara:php_shell_exec" in got and "yara:never_here" not in got
    assert "code_tag_in_non_code_file" in got
