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
