"""The prefilter is the rule's own predicate: for any rule and any process
name and user, it rules a pid out exactly when no event of that process and
user could match."""

from __future__ import annotations

import random
from typing import Optional

import pytest

from agent.sensor.prefilter import Prefilter
from agent.sensor.sources.base import Prefiltering, ReadingAhead
from agent.sensor.sources.fanotify.source import FanotifySource
from agent.sensor.sources.inotify import InotifySource
from agent.shared.clock import FakeClock
from agent.shared.events import CREATION, FileEvent, ProcessInfo, UserInfo
from agent.shared.rule import Rule, matches

NAMES = ["nginx", "php-fpm8.2", "python3", "perl", "bash", "node", "ph", "php-", "rubyx", None]
USERS = [("www-data", "33"), ("root", "0"), ("nginx", "101"), (None, "48"), ("bob", "1000"), (None, None)]


class FakeResolver:
    def __init__(self, name: Optional[str], uid: Optional[int], user: UserInfo) -> None:
        self.known = (name, uid, 12.5)
        self.user = user

    def trusted(self, pid: int) -> Optional[tuple[Optional[str], Optional[int], float]]:
        return self.known if pid == 7 else None

    def user_of(self, uid: int) -> UserInfo:
        return self.user


def _event(name: Optional[str], user: UserInfo) -> FileEvent:
    return FileEvent(
        ts_ms=1, action=CREATION, path=b"/x", process=ProcessInfo(name=name, executable=b"/bin/x"), user=user
    )


@pytest.mark.parametrize("seed", range(20))
def test_prefilter_rules_out_exactly_what_the_rule_cannot_match(seed: int) -> None:
    rng = random.Random(seed)
    rule = Rule(
        combinator=rng.choice(["and", "or"]),
        process_names=tuple(rng.sample(["nginx", "php-*", "python?", "node", "perl*", "ph?-*"], 3)),
        user_names=tuple(rng.sample(["www-data", "nginx", "apache"], 2)),
        user_ids=tuple(rng.sample(["33", "48", "0"], 2)),
    )
    for name in NAMES:
        for uname, uid in USERS:
            user = UserInfo(id=uid, name=uname)
            pre = Prefilter(lambda: rule, FakeResolver(name, 1 if uid else None, user))  # type: ignore[arg-type]
            until, cannot = pre(7)
            if uid is None:  # the user is not known yet: never ruled out
                assert (until, cannot) == (12.5, False)
                continue
            assert until == 12.5
            assert cannot == (not matches(rule, _event(name, user))), (rule, name, user)


def test_an_unknown_pid_may_match() -> None:
    pre = Prefilter(Rule, FakeResolver("bash", 0, UserInfo(id="0", name="root")))  # type: ignore[arg-type]
    assert pre(8) == (0.0, False)


def test_optional_source_capabilities_are_protocols() -> None:
    fan = FanotifySource([b"/srv"], [], clock=FakeClock())
    ino = InotifySource([b"/srv"], [], clock=FakeClock())
    assert isinstance(fan, Prefiltering) and isinstance(fan, ReadingAhead)
    assert not isinstance(ino, Prefiltering) and not isinstance(ino, ReadingAhead)
