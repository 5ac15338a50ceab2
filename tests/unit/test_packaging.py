"""The systemd units, the packaged reference configs and the Debian build."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest

import agent
from agent.shared.config.load import load
from agent.shared.config.schema import AGENT_KEYS, COLLECTOR_KEYS, ENRICH_KEYS, RULE_KEYS, Config
from agent.shared.recommended import RECOMMENDED
from agent.shared.rule import Rule
from tests.support import packages, procs

TOP = Path(__file__).resolve().parents[2]
UNITS = TOP / "systemd"
ETC = TOP / "packaging" / "etc"
DEBIAN = TOP / "packaging" / "debian"


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; systemd allows repeated keys."""
    out = []
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def unit(name: str) -> dict[str, str]:
    """Last value of each [Service]/[Unit]/[Install] key."""
    return {key: value for _, key, value in unit_entries(UNITS / name)}


# ------------------------------------------------------------- units


@pytest.mark.parametrize("name", ["rarewrite-agent.service", "rarewrite-collector.service"])
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed")
    # verify insists that ExecStart's binary exists: point it at one that does.
    text = (UNITS / name).read_text(encoding="utf-8").replace("/usr/bin/rarewrite", "/bin/true")
    (tmp_path / name).write_text(text, encoding="utf-8")
    r = subprocess.run(
        [exe, "verify", "--man=no", str(tmp_path / name)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if name in line or "rarewrite" in line]
    assert r.returncode == 0, r.stdout + r.stderr
    assert complaints == []  # unknown keys are only warnings, with rc 0


def test_agent_unit_least_privilege() -> None:
    u = unit("rarewrite-agent.service")
    assert u["ExecStart"] == "/usr/bin/rarewrite agent run --config /etc/rarewrite/agent.conf"
    assert u["ExecStartPre"] == "/usr/bin/rarewrite config check --config /etc/rarewrite/agent.conf"
    assert set(u["CapabilityBoundingSet"].split()) == {
        "CAP_SYS_ADMIN",
        "CAP_DAC_READ_SEARCH",
        "CAP_SYS_PTRACE",
    }
    assert u["AmbientCapabilities"] == ""
    for key in (
        "NoNewPrivileges",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "ProtectClock",
        "RestrictNamespaces",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert u[key] == "yes", key
    assert u["ProtectSystem"] == "strict"
    assert u["StateDirectory"] == "rarewrite/agent"
    assert u["ReadWritePaths"] == "/var/lib/rarewrite/agent"
    assert set(u["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert u["SystemCallArchitectures"] == "native"
    assert (u["CPUQuota"], u["MemoryMax"], u["Restart"], u["Type"]) == ("20%", "200M", "on-failure", "notify")
    assert (u["NotifyAccess"], u["WatchdogSec"]) == ("main", "60s")
    # the agent must see the real /tmp and /home
    assert "PrivateTmp" not in u
    assert "ProtectHome" not in u


def test_collector_unit_hardening() -> None:
    u = unit("rarewrite-collector.service")
    assert u["ExecStart"] == "/usr/bin/rarewrite collector serve --config /etc/rarewrite/collector.conf"
    assert u["DynamicUser"] == "yes"
    assert u["StateDirectory"] == "rarewrite/collector"
    assert u["LoadCredential"] == "enrollment.secret:/etc/rarewrite/enrollment.secret"
    assert u["CapabilityBoundingSet"] == ""
    for key in ("PrivateTmp", "ProtectHome", "PrivateDevices", "NoNewPrivileges", "MemoryDenyWriteExecute"):
        assert u[key] == "yes", key
    assert u["ProtectSystem"] == "strict"
    assert (u["Type"], u["NotifyAccess"], u["WatchdogSec"]) == ("notify", "main", "60s")
    assert int(u["LimitNOFILE"]) >= 65536  # a connection per agent, and slow clients hold theirs


def test_no_secret_value_in_units() -> None:
    for name in ("rarewrite-agent.service", "rarewrite-collector.service"):
        for _, key, value in unit_entries(UNITS / name):
            assert key != "EnvironmentFile", (name, key)
            if key == "Environment":  # only plain settings, never a credential
                assert [v.split("=", 1)[0] for v in value.split()] == ["TMPDIR"], (name, value)
            assert "--enrollment-secret" not in value, (name, key)


# ------------------------------------------------------------- reference configs


def commented_keys(path: Path) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\[([^\]]+)\]$", line)
        if m:
            section = m.group(1)
        m = re.match(r"^#?([a-z_]+) =", line)
        if m and section:
            keys.setdefault(section, set()).add(m.group(1))
    return keys


# What the packaged collector.conf sets on purpose: the shipped exception list
# and the suppression documented as recommended (an installed collector is quiet).
PACKAGED_RULE = {
    "collector.conf": replace(
        Rule(),
        exceptions=RECOMMENDED,
        suppress_by=("host.name", "process.executable", "file.directory", "file.extension"),
    ),
    "agent.conf": Rule(),
}


def uncommented(path: Path, dest: Path) -> Path:
    """The reference file with every documented key switched on."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        documented = re.match(r"^#([a-z_]+) =", line) or re.match(r"^#    \S", line)
        lines.append(line[1:] if documented else line)
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


@pytest.mark.parametrize(
    ("name", "section", "spec"),
    [("agent.conf", "agent", AGENT_KEYS), ("collector.conf", "collector", COLLECTOR_KEYS)],
)
def test_reference_config_documents_every_key(name: str, section: str, spec: Mapping[str, object]) -> None:
    path = ETC / name
    text = path.read_text(encoding="utf-8")
    assert "do not edit" in text.lower()
    assert f"{name[:-5]}.d/*.conf" in text
    keys = commented_keys(path)
    assert keys[section] == set(spec)
    assert keys["rule"] == set(RULE_KEYS) | ({"exceptions"} if name == "collector.conf" else set())
    if name == "agent.conf":
        assert keys["enrich"] == set(ENRICH_KEYS)


@pytest.mark.parametrize("name", ["agent.conf", "collector.conf"])
def test_reference_config_parses_and_documents_the_defaults(name: str, tmp_path: Path) -> None:
    path = ETC / name
    # as shipped (everything commented): the built-in defaults
    cfg = load([str(path)])
    assert replace(cfg, files=()) == Config(rule=PACKAGED_RULE[name])
    # every documented value switched on: still exactly the defaults
    on = load([str(uncommented(path, tmp_path / name))])
    assert replace(on, files=()) == Config(rule=PACKAGED_RULE[name])


# ------------------------------------------------------------- Debian


def test_debian_version_is_the_package_version() -> None:
    first = (DEBIAN / "changelog").read_text(encoding="utf-8").splitlines()[0]
    m = re.match(r"^rarewrite \(([^)]+)\)", first)
    assert m is not None
    assert m.group(1).split("-")[0] == agent.__version__
    assert "debhelper-compat (= 13)" in (DEBIAN / "control").read_text(encoding="utf-8")


def test_wrapper_puts_private_dir_first(tmp_path: Path) -> None:
    # the packaged command, pointed at this checkout instead of /usr/lib/rarewrite
    text = (DEBIAN / "rarewrite.wrapper").read_text(encoding="utf-8").replace("/usr/lib/rarewrite", str(TOP))
    wrapper = tmp_path / "rarewrite"
    wrapper.write_text(text, encoding="utf-8")
    r = subprocess.run(
        [shutil.which("python3") or "python3", str(wrapper), "--version"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"rarewrite {agent.__version__}"


@pytest.mark.slow
def test_build_deb(tmp_path: Path) -> None:
    if not (shutil.which("dpkg-buildpackage") and shutil.which("dh")) and not _can_apt():
        pytest.skip("debhelper missing and not root with apt-get to install it (build-deb.sh would)")
    debs = [os.path.basename(p) for p in packages.build_debs(tmp_path)]
    v = agent.__version__
    assert debs == [f"rarewrite-{p}_{v}_all.deb" for p in ("agent", "collector", "common")]

    def contents(pkg: str) -> str:
        return subprocess.run(
            ["dpkg-deb", "-c", str(tmp_path / f"rarewrite-{pkg}_{v}_all.deb")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert "./usr/lib/rarewrite/agent/cli.py" in contents("common")
    assert "./usr/bin/rarewrite" in contents("common")
    assert "./lib/systemd/system/rarewrite-agent.service" in contents("agent")
    assert "./etc/rarewrite/collector.conf" in contents("collector")
    for pkg in ("agent", "collector"):
        ctl = tmp_path / f"ctl-{pkg}"
        subprocess.run(
            ["dpkg-deb", "-e", str(tmp_path / f"rarewrite-{pkg}_{v}_all.deb"), str(ctl)], check=True
        )
        assert (ctl / "conffiles").read_text().split() == [f"/etc/rarewrite/{pkg}.conf"]
        postinst = (ctl / "postinst").read_text()
        assert "deb-systemd-helper enable" in postinst
        # an upgrade restarts what ran: nothing stops it for the upgrade, the postinst try-restarts it
        assert f"deb-systemd-invoke try-restart rarewrite-{pkg}.service" in postinst
        prerm = (ctl / "prerm").read_text()
        stops = [line.strip() for line in prerm.splitlines() if "deb-systemd-invoke stop" in line]
        assert stops == [f"deb-systemd-invoke stop rarewrite-{pkg}.service >/dev/null || true"], prerm
        assert 'if [ "$1" = "remove" ]' in prerm  # the only stop is for a removal
    assert "./usr/share/man/man1/rarewrite.1.gz" in contents("common")
    lintian = shutil.which("lintian")
    if lintian is None:
        pytest.skip("lintian not installed (.ci/run installs it)")
    debs = [str(p) for p in sorted(tmp_path.glob("*.deb"))]
    lint = subprocess.run(
        [lintian, "--allow-root", "--pedantic", "--info", *debs],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # nothing at any level: every tag fixed, or overridden with its reason in debian/*.lintian-overrides
    tags = [line for line in lint.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:", "X:")]
    assert (lint.returncode, tags) == (0, []), lint.stdout[-3000:] + lint.stderr[-1000:]


def _can_apt() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def _serve_and_replay_through_the_installed_command(tmp: Path, env: dict[str, str]) -> None:
    """``/usr/bin/rarewrite collector serve`` (its decoding worker started with
    spawn, which runs the wrapper again) takes a batch from ``/usr/bin/rarewrite
    agent replay``: the worker must decode it, not die re-running the command."""
    port = procs.free_port()
    env = {**env, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET}
    now = time.time()
    events = tmp / "events.ndjson"
    doc = {
        "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now - 5)),
        "event": {"action": "creation", "type": ["creation"]},
        "host": {"os": {"type": "linux"}, "name": "web-1"},
        "user": {"name": "www-data", "id": "33"},
        "process": {"name": "nginx", "executable": "/usr/sbin/nginx", "pid": 4242},
        "file": {"path": "/var/www/html/shell.php"},
    }
    events.write_text(json.dumps(doc) + "\n")
    log = open(tmp / "serve.log", "wb")
    serve = subprocess.Popen(
        [
            "/usr/bin/rarewrite",
            "collector",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--db",
            str(tmp / "c.db"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    log.close()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        replay = subprocess.run(
            ["/usr/bin/rarewrite", "agent", "replay", "--events", str(events), "--state-dir", str(tmp / "agent"),
             "--collector", f"http://127.0.0.1:{port}", "--agent-id", "pkg-test", "--host-name", "web-1"],
            capture_output=True, text=True, check=False, env=env, timeout=120,
        )  # fmt: skip
        assert replay.returncode == 0, replay.stderr[-2000:]
    finally:
        procs.stop(serve)
    text = (tmp / "serve.log").read_text(errors="replace")
    assert "decoder_died" not in text and "Traceback" not in text, text[-3000:]
    rows = subprocess.run(
        ["/usr/bin/rarewrite", "collector", "evaluate", "--db", str(tmp / "c.db"), "--at",
         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 1))],
        capture_output=True, text=True, check=True, env=env, timeout=60,
    ).stdout  # fmt: skip
    assert [json.loads(line)["file.path"] for line in rows.splitlines()] == ["/var/www/html/shell.php"]


@pytest.mark.slow
@pytest.mark.root
def test_deb_installs_runs_and_purges(tmp_path: Path) -> None:
    """The packages install with apt (Debian's python3-* libraries, not pip),
    run from /usr/bin with the system Python, and purge cleanly."""
    if not _can_apt() or not shutil.which("dpkg"):
        pytest.skip("needs root and apt-get (a Debian-family machine)")
    if os.path.exists("/usr/bin/rarewrite"):
        pytest.skip("rarewrite is already installed system-wide; not touching it")
    debs = packages.build_debs(tmp_path)
    try:
        packages.install(debs)
        clean_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # no venv, no PYTHONPATH
        version = subprocess.run(
            ["/usr/bin/rarewrite", "--version"],
            capture_output=True,
            text=True,
            check=False,
            env=clean_env,
            timeout=60,
        )
        assert version.returncode == 0 and version.stdout.strip() == f"rarewrite {agent.__version__}", version
        for conf in ("agent", "collector"):
            check = subprocess.run(
                ["/usr/bin/rarewrite", "config", "check", "--config", f"/etc/rarewrite/{conf}.conf"],
                capture_output=True,
                text=True,
                check=False,
                env=clean_env,
                timeout=60,
            )
            assert check.returncode == 0, check.stderr
        assert (os.stat("/etc/rarewrite/enrollment.secret").st_mode & 0o077) == 0
        _serve_and_replay_through_the_installed_command(tmp_path, clean_env)
    finally:
        packages.purge()
    assert not os.path.exists("/usr/bin/rarewrite") and not os.path.exists("/usr/lib/rarewrite")


@pytest.mark.slow
def test_build_rpm(tmp_path: Path) -> None:
    """The RHEL/Fedora spec builds with rpmbuild (Debian's `rpm` package here)."""
    if not shutil.which("rpmbuild") and not _can_apt():
        pytest.skip("rpmbuild missing and not root with apt-get to install it (build-rpm.sh would)")
    r = subprocess.run(
        [str(TOP / "packaging" / "build-rpm.sh"), "--worktree"],
        check=False,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "RAREWRITE_DIST": str(tmp_path)},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rpms = sorted(p.name for p in tmp_path.glob("*.rpm") if not p.name.endswith(".src.rpm"))
    assert [n.split("-0")[0] for n in rpms] == [
        "rarewrite-agent",
        "rarewrite-collector",
        "rarewrite-common",
    ], rpms
    listing = subprocess.run(
        ["rpm", "-qlp", str(next(tmp_path.glob("rarewrite-agent-*.noarch.rpm")))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "/etc/rarewrite/agent.conf" in listing and "rarewrite-agent.service" in listing
    common = subprocess.run(
        ["rpm", "-qlp", str(next(tmp_path.glob("rarewrite-common-*.noarch.rpm")))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "/usr/share/man/man1/rarewrite.1.gz" in common
    assert any(p.endswith("/LICENSE") for p in common)
    collector = subprocess.run(
        ["rpm", "-qlp", str(next(tmp_path.glob("rarewrite-collector-*.noarch.rpm")))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "/etc/rarewrite/enrollment.secret" in collector  # made by %post, owned by the package
    rpmlint = shutil.which("rpmlint")
    if rpmlint is None:
        pytest.skip("rpmlint not installed (.ci/run installs it)")
    lint = subprocess.run(
        [
            rpmlint,
            "-c",
            str(TOP / "packaging" / "rpm" / "rpmlint.toml"),
            *map(str, tmp_path.glob("*.noarch.rpm")),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert "0 errors, 0 warnings" in lint.stdout, lint.stdout[-3000:]


@pytest.mark.parametrize(
    ("name", "most"), [("rarewrite-collector.service", 2.0), ("rarewrite-agent.service", 3.3)]
)
def test_systemd_analyze_security_exposure(name: str, most: float) -> None:
    """The units' exposure as systemd scores it (README's packaging section
    says what the agent's is made of): no change may raise it."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed")
    r = subprocess.run(
        [exe, "security", "--offline=yes", str(TOP / "systemd" / name)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if "--offline" in r.stderr and "unrecognized" in r.stderr:
        pytest.skip("systemd-analyze too old for --offline (systemd < 250)")
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert found is not None, r.stdout[-2000:] + r.stderr[-2000:]
    assert float(found.group(1)) <= most, r.stdout[-3000:]
