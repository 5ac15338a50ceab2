"""Layered config: converters, every error at once, overrides, and the CLI's exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import cli
from agent.shared import config
from agent.shared.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("90s", 90_000),
        ("15m", 900_000),
        ("1h", 3_600_000),
        ("2d", 172_800_000),
        ("500ms", 500),
        ("30", 30_000),
        ("1.5h", 5_400_000),
    ],
)
def test_durations(text: str, ms: int) -> None:
    assert config.duration_ms(text) == ms


@pytest.mark.parametrize("text", ["forty minutes", "1 hour", "-5s", "0s", "", "h", "1y"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|longer than zero"):
        config.duration_ms(text)


def test_sizes() -> None:
    assert config.size_bytes("8MiB") == 8 << 20
    assert config.size_bytes("512") == 512
    with pytest.raises(ValueError):
        config.size_bytes("lots")


def test_defaults_are_the_published_rule(tmp_path: Path) -> None:
    cfg = config.load([str(tmp_path / "absent.conf")], required=False)
    assert cfg.rule.window_ms == 3_600_000 and cfg.rule.count_below == 5 and cfg.rule.limit == 100
    assert cfg.rule.combinator == "and" and cfg.rule.severity == "medium" and cfg.rule.risk_score == 47
    assert cfg.agent.backend == "auto"


def test_layers_override_key_by_key(tmp_path: Path) -> None:
    main = tmp_path / "agent.conf"
    main.write_text("[rule]\nwindow = 2h\ncount_below = 3\n[agent]\nwatch =\n    /var/www\n    /srv\n")
    (tmp_path / "agent.d").mkdir()
    (tmp_path / "agent.d" / "10-site.conf").write_text("[rule]\ncount_below = 4\n")
    (tmp_path / "agent.d" / "20-names.conf").write_text(
        "[rule]\nprocess_names =\n    nginx\n    php-fpm8.2\n"
    )
    cfg = config.load([str(main)])
    assert cfg.rule.window_ms == 7_200_000 and cfg.rule.count_below == 4
    assert cfg.rule.process_names == ("nginx", "php-fpm8.2")
    assert cfg.agent.watch == ("/var/www", "/srv")
    assert len(cfg.files) == 3


def test_every_mistake_is_listed_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "agent.conf"
    bad.write_text(
        "[rule]\nwindow = forty minutes\ncount_below = -3\ncombinator = xor\n"
        "[agent]\nbackend = telepathy\nwatch = relative/path\ncolector = http://x\n"
        "[bogus]\na = 1\n"
    )
    with pytest.raises(ConfigError) as e:
        config.load([str(bad)])
    text = "\n".join(e.value.problems)
    for needle in ("window", "count_below", "combinator", "backend", "watch", "colector", "[bogus]"):
        assert needle in text
    assert len(e.value.problems) == 7
    assert all(str(bad) in p for p in e.value.problems)


def test_a_syntax_error_is_reported_with_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "agent.conf"
    bad.write_text("no section header\n")
    with pytest.raises(ConfigError, match=r"agent\.conf"):
        config.load([str(bad)])


def test_command_line_values_are_validated_like_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="command line"):
        config.load([], overrides={"agent": {"backend": "magic", "watch": "/srv"}})


def test_retention_must_cover_the_window() -> None:
    with pytest.raises(ConfigError, match="retention"):
        config.load([], overrides={"rule": {"window": "5h"}, "collector": {"retention": "4h"}})


def test_config_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.conf"
    good.write_text("[rule]\nwindow = 2h\n[agent]\nbackend = inotify\n")
    assert cli.main(["config", "check", "--config", str(good)]) == 0
    assert '"window_ms": 7200000' in capsys.readouterr().out
    bad = tmp_path / "bad.conf"
    bad.write_text("[rule]\nwindow = soon\ncount_below = many\n[agent]\nbackend = telepathy\n")
    assert cli.main(["config", "check", "--config", str(bad)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert sum(1 for line in err if line.startswith("config error:")) == 3
    assert cli.main(["config", "check", "--config", str(tmp_path / "missing.conf")]) == cli.EXIT_CONFIG


def test_config_check_never_prints_a_database_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "collector.conf"
    conf.write_text("[collector]\ndb = postgresql://rw:hunter2@db.example.org/rarewrite\n")
    assert cli.main(["config", "check", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "rw:***@db.example.org" in out


def test_an_agent_id_or_host_name_the_collector_would_refuse_stops_the_agent_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        config.load([], overrides={"agent": {"agent_id": "web 01", "host_name": "h" * 300}})
    assert len(e.value.problems) == 2


def test_exceptions_and_suppression_config(tmp_path: Path) -> None:
    from agent.shared.recommended import RECOMMENDED

    f = tmp_path / "collector.conf"
    f.write_text(
        "[rule]\nexceptions = recommended, thumbs\nsuppress_by = host.name, file.extension\n"
        "suppress_for = 30m\nsuppress_missing = do_not_suppress\n"
        "[exception.thumbs]\nfile.path = /srv/*/thumbs/*\n    /srv/cache/*\nprocess.name = php-fpm*\n"
        "expires = 2099-01-01T00:00:00Z\ncomment = the CMS renders thumbnails\n"
        "[exception.unused]\nuser.id = 33\n"
    )
    rule = config.load([str(f)], strict_expiry=True).rule
    assert rule.exceptions[: len(RECOMMENDED)] == RECOMMENDED
    own = rule.exceptions[-1]
    assert own.name == "thumbs" and own.comment == "the CMS renders thumbnails"
    assert own.fields() == {"file.path": ("/srv/*/thumbs/*", "/srv/cache/*"), "process.name": ("php-fpm*",)}
    assert own.expires_ms == 4_070_908_800_000
    assert len(rule.exceptions) == len(RECOMMENDED) + 1  # a section not named in [rule] exceptions is off
    assert (rule.suppress_by, rule.suppress_for_ms, rule.suppress_missing) == (
        ("host.name", "file.extension"), 1_800_000, "do_not_suppress",
    )  # fmt: skip
    f.write_text(
        "[rule]\nexceptions = tmp\n[exception.tmp]\nfile.path = /tmp/*\nmissing = file.extension\n"
        "[exception.bad]\nfile.path = /x\nmissing = file.path, colour\n"
    )
    with pytest.raises(ConfigError) as e:
        config.load([str(f)])
    assert len(e.value.problems) == 2 and "can never be missing" in e.value.problems[0] + e.value.problems[1]
    f.write_text("[rule]\nexceptions = tmp\n[exception.tmp]\nfile.path = /tmp/*\nmissing = file.extension\n")
    assert config.load([str(f)]).rule.exceptions[0].missing == ("file.extension",)
    f.write_text("[rule]\nexceptions = none\n")
    assert config.load([str(f)]).rule.exceptions == ()
    assert config.load([str(tmp_path / "missing.conf")], required=False).rule.exceptions == ()


def test_every_exception_mistake_is_listed_at_once(tmp_path: Path) -> None:
    f = tmp_path / "collector.conf"
    f.write_text(
        "[rule]\nexceptions = mine, none, nosuch\nsuppress_by = user.name\nsuppress_missing = maybe\n"
        "[exception.mine]\nfile.colour = red\nfile.path = /a\\\\b\\x\n    \nexpires = someday\n"
        "[exception.old]\nfile.path = /x\nexpires = 2020-01-01T00:00:00Z\n"
        "[exception.bad name!]\nfile.path = /y\n"
        "[exception.empty]\ncomment = names no field\n"
    )
    with pytest.raises(ConfigError) as e:
        config.load([str(f)], strict_expiry=True)
    text = "\n".join(e.value.problems)
    for needle in (
        "file.colour: unknown field", "bad glob", "someday", "2020-01-01T00:00:00.000Z has passed",
        "[exception.bad name!]", "[exception.empty]: names no field", "none alone", "suppress_by",
        "suppress_missing",
    ):  # fmt: skip
        assert needle in text, needle
    assert len(e.value.problems) == 9, text
    # a running collector only stops applying a passed expiry: no error without strict_expiry
    f.write_text(
        "[rule]\nexceptions = old\n[exception.old]\nfile.path = /x\nexpires = 2020-01-01T00:00:00Z\n"
    )
    assert config.load([str(f)]).rule.exceptions[0].expires_ms == 1_577_836_800_000
    with pytest.raises(ConfigError, match="has passed"):
        config.load([str(f)], strict_expiry=True)


def test_plain_http_to_another_host_is_refused_unless_allowed(tmp_path: Path) -> None:
    f = tmp_path / "a.conf"
    for url, ok in (
        ("http://127.0.0.1:8787", True), ("http://[::1]:8787", True), ("http://localhost:8787", True),
        ("https://collector.example:8787", True), ("http://10.0.0.5:8787", False),
        ("http://collector.example", False),
    ):  # fmt: skip
        f.write_text(f"[agent]\ncollector = {url}\n")
        if ok:
            config.load([str(f)])
        else:
            with pytest.raises(ConfigError, match="plain http:// to another host"):
                config.load([str(f)])
            f.write_text(f"[agent]\ncollector = {url}\nallow_plain_http = yes\n")
            assert config.load([str(f)]).agent.collector == url
    f.write_text("[output.soc]\ntype = webhook\nurl = http://hooks.example/services/T0/B0/s3cr3t\n")
    with pytest.raises(ConfigError) as e:
        config.load([str(f)])
    assert "plain http://" in str(e.value.problems) and "s3cr3t" not in str(e.value.problems)
    f.write_text("[output.soc]\ntype = webhook\nurl = http://hooks.example/x\nallow_plain_http = yes\n")
    config.load([str(f)])


def test_url_paths_and_queries_never_reach_config_check_or_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from agent.collector.outputs import build_outputs

    f = tmp_path / "c.conf"
    f.write_text(
        "[agent]\ncollector = https://rw:pw@collector.example:8787/x?token=agent-t0ken\n"
        "[output.soc]\ntype = webhook\nurl = https://hooks.example/services/T0/B0/s3cr3t?key=k3y\n"
    )
    assert cli.main(["config", "check", "--config", str(f)]) == 0
    out = capsys.readouterr().out
    for secret in ("s3cr3t", "k3y", "agent-t0ken", ":pw@"):
        assert secret not in out
    assert "https://hooks.example/***" in out
    with caplog.at_level("INFO"):
        outputs = build_outputs(config.load([str(f)]))
    assert "s3cr3t" not in caplog.text and "hooks.example/***" in caplog.text
    assert "s3cr3t" not in repr(outputs[0])
    for o in outputs:
        o.close()
