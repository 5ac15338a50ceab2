"""The rules beside the first one, as data, and what the agent keeps for all of them.

:class:`NewTermsRule` is Elastic's 2026 "Unusual File Creation via Web
Server" (``shared/rule/unusual-file-creation-via-web-server.new-terms.txt``):
a per-host *new terms* rule on (``file.path``, ``host.id``,
``process.executable``) with a 7-day history. :func:`new_terms_match` is its
KQL query for one event, exactly:

- a quoted value matches exactly; an unquoted value with ``*`` is a wildcard
  (any run of characters, ``/`` included; there is no other wildcard);
  matching is case-sensitive and covers the whole value;
- ``user.id >= 1000`` compares the value as a number (a value that is not a
  number never matches); ``user.id: 0`` is exact;
- ``file.extension`` is what follows the name's last dot
  (:func:`agent.shared.exceptions.file_extension`, the same function
  exceptions and suppression use);
- the new-terms fields must all be present: an event without an executable
  or a path is not a candidate (Elastic skips documents missing a field).

:class:`OutbreakRule` is rarewrite's own: the same (executable, path), new on
each host by a new-terms rule, written on at least ``hosts`` hosts within
``within_ms``: one alert for the fleet.

:class:`RuleSet` is the agent's view: an event is kept when any enabled rule
could match it, with a bit per rule saying which (the collector counts each
rule's events only; see :mod:`agent.shared.wire.format`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import NamedTuple, Optional, Union

from agent.shared.events import FileEvent, UserInfo
from agent.shared.exceptions import file_extension, text_of
from agent.shared.rule import Rule, Technique, matches

NEW_TERMS = "new_terms"
OUTBREAK = "outbreak"
RULE_TYPES = (NEW_TERMS, OUTBREAK)
NAMES_CACHED = 4096  # process names a new-terms rule remembers its answer for
MAX_RULES = 32  # rule bits on the wire (and in the agent's outbox) fit one small int

NT_PROCESS_NAMES = (
    "nginx", "apache2", "httpd", "caddy", "lighttpd", "httpd.worker", "httpd-worker", "httpd-prefork",
    "php-cgi", "php-fcgi", "php-cgi.cagefs", "frankenphp", "lshttpd", "litespeed", "openlitespeed",
    "fcgiwrap", "uwsgi", "daphne", "uvicorn", "hypercorn", "granian", "waitress-serve", "flask", "puma",
    "unicorn", "unicorn_rails", "thin", "rackup", "mongrel_rails", "starman", "plackup", "twiggy",
    "hypnotoad", "starlet", "unitd", "unitd-debug", "php-fpm*", "lsphp*", "gunicorn*", "nginx3",
    "apache", "*.cgi", "*.fcgi",
)  # fmt: skip
# (process names, extensions): these processes only count for these extensions
NT_GATED = (
    (("java",), ("jsp", "jspx", "jspf", "tag", "tagx", "war", "ear")),
    (("node", "nodejs"), ("js", "mjs", "cjs", "ts", "mts", "cts")),
    (("dotnet",), ("cshtml", "razor")),
    (
        ("mono*", "xsp*", "mod-mono-server*", "fastcgi-mono-server*"),
        ("asp", "aspx", "ashx", "asmx", "ascx", "cshtml"),
    ),
    (("python*",), ("wsgi", "cgi", "fcgi")),
    (("ruby*",), ("erb", "ru")),
    (("perl*",), ("cgi", "fcgi", "psgi")),
    (("lua*",), ("lua", "luac")),
)  # fmt: skip
NT_PATHS = (
    "/home/*/*", "/var/www/*", "/srv/www/*", "/srv/http/*", "/usr/share/nginx/*", "/opt/zimbra/jetty*",
    "/usr/share/caddy/*", "/usr/local/lsws/*", "/opt/bitnami/*", "*/sites/*/files/*",
    "/opt/easyengine/*", "*/wp-content/*", "*/httpdocs/*", "*/httpsdocs/*", "*/htdocs/*", "*/wwwroot/*",
    "*/webroot/*", "*/cgi-bin/*", "*/upload/*", "*/uploads/*", "*/images/*", "*/media/*",
    "*/userfiles/*", "*/attachments/*", "/usr/share/webapps/*", "/usr/share/zabbix/*",
    "/usr/share/phpmyadmin/*", "/usr/share/phpMyAdmin/*", "/var/lib/roundcube/*", "/usr/share/cacti/*",
    "/usr/share/nagios*", "/var/lib/tomcat*", "/usr/share/tomcat*", "/usr/local/tomcat/*",
    "/opt/tomcat*", "/var/lib/jetty*", "/usr/share/jetty*", "/usr/local/cpanel/*", "/usr/local/psa*",
    "/opt/psa/admin/*", "/usr/share/webmin/*", "/usr/libexec/webmin/*", "/usr/local/nginx/*",
    "/usr/local/apache*", "/usr/sap/*", "/opt/rh/*", "*/public_html/*", "*/private_html/*",
    "*/public/*", "*/private/*", "*/deployments/*", "*/autodeploy/*", "*/dropins/*",
    "*/installedApps/*", "/srv/caddy/*", "/usr/local/openresty/*", "*/fileadmin/*", "*/custom_apps/*",
    "*/vhost*", "/opt/apache-tomcat*", "/opt/jetty*", "/usr/local/jetty*", "*/wildfly*/*", "*/jboss*/*",
    "*/glassfish/*", "*/user_projects/domains/*", "*/resin*/webapps/*", "*/installedApps/*",
)  # fmt: skip
NT_TAGS = (
    "Domain: Endpoint", "Domain: Web", "OS: Linux", "Use Case: Threat Detection", "Tactic: Persistence",
    "Tactic: Execution", "Tactic: Command and Control", "Tactic: Initial Access",
    "Data Source: Elastic Defend", "Resources: Investigation Guide", "Noise: High", "Performance: Slow",
    "Profile: Aggressive", "Threat: Web Shell", "Rule Type: New Terms", "Platform: Linux",
)  # fmt: skip
NT_THREAT = (
    Technique("TA0003", "Persistence", "T1505", "Server Software Component", "T1505.003", "Web Shell"),
    Technique("TA0002", "Execution", "T1059", "Command and Scripting Interpreter", "T1059.004", "Unix Shell"),
    Technique("TA0011", "Command and Control", "T1071", "Application Layer Protocol"),
    Technique("TA0001", "Initial Access", "T1190", "Exploit Public-Facing Application"),
)


@dataclass(frozen=True)
class Exclusion:
    """One clause of the query's ``not (...)`` block: every part it names must
    hold (AND); within a part any value does (OR). ``uid_at_least`` and
    ``uids`` are one part: ``user.id >= N or user.id: V``."""

    process_names: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    uid_at_least: Optional[int] = None
    uids: tuple[str, ...] = ()

    @cached_property
    def _process(self) -> Optional[KqlValues]:
        return KqlValues(self.process_names) if self.process_names else None

    @cached_property
    def _path(self) -> Optional[KqlValues]:
        return KqlValues(self.paths) if self.paths else None

    def process_holds(self, name: Optional[str]) -> bool:
        return self._process is None or (name is not None and self._process(name))

    def holds(self, name: Optional[str], path: str, uid: Optional[str]) -> bool:
        return self.process_holds(name) and self.rest_holds(path, uid)

    def rest_holds(self, path: str, uid: Optional[str]) -> bool:
        """The path and user parts (the process part is decided once per name)."""
        if self._path is not None and not self._path(path):
            return False
        if self.uid_at_least is None and not self.uids:
            return True
        if uid is None:
            return False
        if uid in self.uids:
            return True
        return self.uid_at_least is not None and uid.isdigit() and int(uid) >= self.uid_at_least


NT_EXCLUSIONS = (
    Exclusion(paths=("*/storage/framework/sessions/*",)),
    Exclusion(
        process_names=("php-fpm*",),
        paths=(
            "/mnt/WEB/*/public_html/tmp/templates/frontend/*.php",
            "/mnt/WEB/*/public_html/wp-content/languages/*.json",
        ),
    ),
    Exclusion(process_names=("node",), uid_at_least=1000, uids=("0",)),
)


def kql_regex(values: Sequence[str]) -> re.Pattern[str]:
    """KQL values as one anchored regex: ``*`` any run, everything else literal."""
    alts = ("".join(".*" if ch == "*" else re.escape(ch) for ch in v) for v in values)
    return re.compile("(?:" + "|".join(alts) + r")\Z", re.DOTALL)


class KqlValues:
    """KQL values as one test, with the answer of ``kql_regex(values).match``
    at a fraction of its cost: most values are ``P*`` (a prefix), ``*S`` (a
    suffix), ``*/name/*`` (a folder of that name) or ``*S*`` (a substring),
    each a string method; the rest is one regex."""

    __slots__ = ("_checks", "folders", "rest")

    def __init__(self, values: Sequence[str]) -> None:
        exact, prefixes, suffixes, folders, subs, rest = _forms(values)
        self.folders = frozenset(folders)
        self.rest = kql_regex(rest) if rest else None
        # only the forms present, cheapest first: one call each
        checks: list[Callable[[str], bool]] = []
        if exact:
            checks.append(frozenset(exact).__contains__)
        if prefixes:
            checks.append(partial(_starts, tuple(prefixes)))
        if suffixes:
            checks.append(partial(_ends, tuple(suffixes)))
        if folders:
            checks.append(partial(_in_folder, self.folders))
        checks.extend(partial(_contains, sub) for sub in subs)
        if self.rest is not None:
            checks.append(partial(_rest, self.rest))
        self._checks = tuple(checks)

    def __call__(self, text: str) -> bool:
        for check in self._checks:
            if check(text):
                return True
        return False


def _forms(values: Sequence[str]) -> tuple[set[str], list[str], list[str], set[str], list[str], list[str]]:
    """The values sorted by form: exact, ``P*``, ``*S``, ``*/name/*``, ``*S*``, anything else."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    folders: set[str] = set()
    subs: list[str] = []
    rest: list[str] = []
    for v in values:
        parts = v.split("*")
        if len(parts) == 1:
            exact.add(v)
        elif len(parts) == 2 and not parts[1]:
            prefixes.append(parts[0])
        elif len(parts) == 2 and not parts[0]:
            suffixes.append(parts[1])
        elif len(parts) == 3 and not parts[0] and not parts[2]:
            inner = parts[1]
            if len(inner) > 2 and inner[0] == inner[-1] == "/" and "/" not in inner[1:-1]:
                folders.add(inner[1:-1])
            else:
                subs.append(inner)
        else:
            rest.append(v)
    return exact, prefixes, suffixes, folders, subs, rest


def _starts(prefixes: tuple[str, ...], text: str) -> bool:
    return text.startswith(prefixes)


def _ends(suffixes: tuple[str, ...], text: str) -> bool:
    return text.endswith(suffixes)


def _in_folder(names: frozenset[str], text: str) -> bool:
    # "/name/" occurs in the text exactly when name is one of its inner segments
    return not names.isdisjoint(text.split("/")[1:-1])


def _contains(sub: str, text: str) -> bool:
    return sub in text


def _rest(rx: re.Pattern[str], text: str) -> bool:
    return rx.match(text) is not None


class ByName(NamedTuple):
    """What a new-terms rule says about one process name, whatever the file."""

    always: bool  # a web server by name: any extension
    extensions: frozenset[str]  # else: the extensions its gates allow
    excluded_paths: Optional[KqlValues]  # the applicable exclusions with a path part only, as one
    exclusions: tuple[Exclusion, ...]  # the other applicable ones (a user part, or none at all)

    def could_match(self) -> bool:
        """A write by this process can match (for some file)."""
        return self.always or bool(self.extensions)

    def allows(self, extension: Optional[str]) -> bool:
        """A write of a file with this extension can match."""
        return self.always or (extension is not None and extension in self.extensions)

    def excluded(self, path: str, uid: Optional[str]) -> bool:
        if self.excluded_paths is not None and self.excluded_paths(path):
            return True
        return any(x.rest_holds(path, uid) for x in self.exclusions)


@dataclass(frozen=True)
class NewTermsRule:
    """Every part of the new-terms rule; the defaults are the published one."""

    key: str = "via-web-server"  # the name in config ([rule.KEY]) and on the command line
    name: str = "Unusual File Creation via Web Server"
    rule_id: str = "9ab15ca6-be79-4718-bae6-5978a3ac6a46"
    description: str = (
        "A web server process created or renamed a file under a web content path that this host "
        "had not seen written by that executable in the last 7 days: a possible web shell."
    )
    enabled: bool = True
    actions: tuple[str, ...] = ("creation", "rename")
    os_type: str = "linux"
    process_names: tuple[str, ...] = NT_PROCESS_NAMES
    gated: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = NT_GATED
    paths: tuple[str, ...] = NT_PATHS
    exclusions: tuple[Exclusion, ...] = NT_EXCLUSIONS
    history_ms: int = 7 * 86_400_000
    lookback_ms: int = 9 * 60_000  # "searches from now-9m": what `collector evaluate --at T` prints
    schedule_ms: int = 5 * 60_000
    severity: str = "low"
    risk_score: int = 21
    building_block: bool = False
    tags: tuple[str, ...] = NT_TAGS
    threat: tuple[Technique, ...] = field(default=NT_THREAT)
    type: str = NEW_TERMS
    quarantine: bool = False  # the agent moves an alert's file aside (opt-in, on both sides)

    @cached_property
    def _always(self) -> KqlValues:
        return KqlValues(self.process_names)

    @cached_property
    def _gates(self) -> tuple[tuple[KqlValues, frozenset[str]], ...]:
        return tuple((KqlValues(names), frozenset(exts)) for names, exts in self.gated)

    @cached_property
    def _paths(self) -> KqlValues:
        return KqlValues(self.paths)

    @cached_property
    def _names(self) -> dict[str, ByName]:
        return {}  # process name -> its ByName: a host runs few names

    def by_name(self, name: str) -> ByName:
        """What the rule says of a process name (remembered: a host runs few)."""
        got = self._names.get(name)
        if got is None:
            if len(self._names) >= NAMES_CACHED:
                self._names.clear()
            exts: frozenset[str] = frozenset()
            for match, allowed in self._gates:
                if match(name):
                    exts |= allowed
            applicable = [x for x in self.exclusions if x.process_holds(name)]
            by_path = [
                v for x in applicable if x.paths and x.uid_at_least is None and not x.uids for v in x.paths
            ]
            others = tuple(x for x in applicable if not x.paths or x.uid_at_least is not None or x.uids)
            merged = KqlValues(by_path) if by_path else None
            got = self._names[name] = ByName(self._always(name), exts, merged, others)
        return got

    def process_could_match(self, name: Optional[str]) -> bool:
        """Can a write by this process match at all (whatever the file)?"""
        return name is not None and self.by_name(name).could_match()

    def process_matches(self, name: Optional[str], extension: Optional[str]) -> bool:
        return name is not None and self.by_name(name).allows(extension)

    def path_matches(self, path: str) -> bool:
        return self._paths(path)

    def excluded(self, name: Optional[str], path: str, uid: Optional[str]) -> bool:
        if name is None:
            return any(x.holds(name, path, uid) for x in self.exclusions)
        return self.by_name(name).excluded(path, uid)


def new_terms_match(rule: NewTermsRule, event: FileEvent) -> bool:
    """The rule's KQL query for one event."""
    if event.os_type != rule.os_type or event.action not in rule.actions:
        return False
    name = event.process.name
    if not event.path or not event.process.executable or name is None:
        return False
    known = rule.by_name(name)
    if not known.could_match():
        return False
    path = text_of(event.path)
    assert path is not None  # noqa: S101 - checked above; for mypy
    if not known.always and not known.allows(file_extension(path)):
        return False
    if not rule.path_matches(path):
        return False
    return not known.excluded(path, event.user.id)


@dataclass(frozen=True)
class OutbreakRule:
    """One file dropped on many hosts at once (mass exploitation of one flaw):
    the same (executable, path) new on each host by the new-terms rule
    ``source``, on at least ``hosts`` hosts within ``within_ms``.

    Defaults: 3 hosts, because two is what a pair of replicas or a
    primary/standby writing the same cache file looks like, and three hosts
    of one fleet new to the same web-server write within minutes is no longer
    that; 15 minutes, because a campaign exploiting one flaw sweeps a fleet's
    addresses in minutes, while a window of hours would join unrelated
    first-time writes of a common name (``uploads/image.png``)."""

    key: str = "outbreak"
    name: str = "Web Server File Outbreak"
    rule_id: str = "rarewrite-web-server-file-outbreak"
    description: str = (
        "The same web-server executable wrote the same new file on several hosts within minutes: "
        "a possible mass exploitation of one flaw."
    )
    enabled: bool = True
    source: str = "via-web-server"  # the key of the new-terms rule whose new events count
    hosts: int = 3
    within_ms: int = 15 * 60_000
    schedule_ms: int = 5 * 60_000
    severity: str = "high"
    risk_score: int = 73
    building_block: bool = False
    tags: tuple[str, ...] = (
        "Domain: Endpoint", "Domain: Web", "OS: Linux", "Use Case: Threat Detection",
        "Tactic: Initial Access", "Tactic: Persistence", "Threat: Web Shell", "Rule Type: Threshold",
    )  # fmt: skip
    threat: tuple[Technique, ...] = (
        Technique("TA0001", "Initial Access", "T1190", "Exploit Public-Facing Application"),
        Technique("TA0003", "Persistence", "T1505", "Server Software Component", "T1505.003", "Web Shell"),
    )
    type: str = OUTBREAK
    quarantine: bool = False


AnyRule = Union[Rule, NewTermsRule, OutbreakRule]
FIRST_RULE_KEY = "by-web-server"


def rule_key(rule: AnyRule) -> str:
    return FIRST_RULE_KEY if isinstance(rule, Rule) else rule.key


def default_rules() -> tuple[Union[NewTermsRule, OutbreakRule], ...]:
    return (NewTermsRule(), OutbreakRule())


def find_rule(
    first: Rule, others: Sequence[Union[NewTermsRule, OutbreakRule]], name: str
) -> Optional[AnyRule]:
    """The rule a user named by key, rule id or name (None: no such rule)."""
    for r in (first, *others):
        if name in (rule_key(r), r.rule_id, r.name):
            return r
    return None


class RuleSet:
    """What the agent keeps: events any enabled rule could match. Each kept
    event gets a mask, bit i set when ``ids[i]`` matches it. The first rule
    (``Rule``) is bit 0 when enabled; outbreak rules need nothing the
    new-terms rules do not keep already."""

    def __init__(self, first: Rule, others: Sequence[Union[NewTermsRule, OutbreakRule]] = ()) -> None:
        self.first: Optional[Rule] = first if first.enabled else None
        self.new_terms = tuple(r for r in others if isinstance(r, NewTermsRule) and r.enabled)
        self.ids: tuple[str, ...] = ((first.rule_id,) if self.first else ()) + tuple(
            r.rule_id for r in self.new_terms
        )

    def could_match(self, process_name: Optional[str], user: UserInfo) -> bool:
        """Can a write by this process as this user match any rule?"""
        if self.first is not None and self.first.could_match(process_name, user):
            return True
        return any(r.process_could_match(process_name) for r in self.new_terms)

    def process_matches(self, name: Optional[str]) -> bool:
        """Is this a web-server process for some rule (whoever runs it)?"""
        if self.first is not None and self.first.process_matches(name):
            return True
        return any(r.process_could_match(name) for r in self.new_terms)

    def mask(self, event: FileEvent) -> int:
        """Bit i: rule ``ids[i]`` matches the event (0: keep nothing)."""
        bits, i = 0, 0
        if self.first is not None:
            if matches(self.first, event):
                bits = 1
            i = 1
        for r in self.new_terms:
            if new_terms_match(r, event):
                bits |= 1 << i
            i += 1
        return bits
