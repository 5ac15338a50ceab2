"""The rules' process and user predicates, asked per pid before an event is
resolved: a busy host's writes by processes that cannot match cost a few
dictionary lookups, not a /proc read each."""

from __future__ import annotations

from collections.abc import Callable

from agent.sensor.resolver import Resolver
from agent.shared.rules import RuleSet


class Prefilter:
    """``prefilter(pid)`` -> (until, cannot_match): until that monotonic time
    no event of ``pid`` can match any rule (or some may).

    The pid's name and user come from the resolver's trusted cache, checked
    against /proc at most every ``TRUST_S``, and are judged by
    :meth:`RuleSet.could_match`: the process and user parts of the predicates
    :meth:`RuleSet.mask` applies to a resolved event, so the prefilter drops
    nothing a rule would keep. An unknown pid, or one whose user is not known
    yet, may match. ``rule`` is called each time: a reload swaps the rules at once."""

    def __init__(self, rule: Callable[[], RuleSet], resolver: Resolver) -> None:
        self._rule = rule
        self._resolver = resolver

    def __call__(self, pid: int) -> tuple[float, bool]:
        known = self._resolver.trusted(pid)
        if known is None:
            return (0.0, False)
        name, euid, until = known
        if euid is None:
            return (until, False)
        return (until, not self._rule().could_match(name, self._resolver.user_of(euid)))
