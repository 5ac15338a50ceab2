"""The bench scripts keep working: each runs with --quick (tiny sizes).

No timing is asserted here, only that a script exits 0 and that its last
stdout line is one JSON object with the expected keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root (fanotify, mount, setpriv)"
)


def _run(script: str, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), "--quick", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    doc = json.loads(lines[-1])
    assert isinstance(doc, dict)
    assert {"nproc", "mem_mb", "kernel", "python"} <= set(doc["machine"])
    assert doc["quick"] is True
    return doc


def test_wire_bytes_quick() -> None:
    doc = _run("wire_bytes.py")
    assert doc["bench"] == "wire_bytes"
    kinds = {f["fleet"]: f for f in doc["fleets"]}
    assert set(kinds) == {"repeat", "unique"}
    for f in kinds.values():
        assert {"body_bytes_per_event", "upstream_bytes_per_event", "records_per_batch_median"} <= set(f)
        assert {"detail_events", "count_times", "rows_equal_oracle"} <= set(f)
        assert f["rows_equal_oracle"] is True


@needs_root  # the throwaway PostgreSQL cluster is started as its own user
def test_pg_ingest_quick() -> None:
    doc = _run("pg_ingest.py")
    assert doc["bench"] == "pg_ingest"
    assert {r["setup"] for r in doc["ingest"]} == {"sqlite-1", "pg-2"}
    for r in doc["ingest"]:
        assert r["non_2xx"] == 0 and r["records_per_s"] > 0 and r["records_per_cpu_s"] > 0
    assert {e["store"] for e in doc["evaluate"]} == {"postgresql", "sqlite"}
    assert len({e["rows"] for e in doc["evaluate"]}) == 1  # both stores find the same rows


@needs_root  # the throwaway PostgreSQL cluster is started as its own user
def test_continuous_tick_quick() -> None:
    doc = _run("continuous_tick.py", "--both-rules")
    assert doc["bench"] == "continuous_tick"
    runs = doc["runs"]
    assert {(r["store"], r["events"]) for r in runs} == {
        (s, n) for s in ("sqlite", "postgresql") for n in (20000, 40000)
    }
    for r in runs:
        assert r["alerted_before"] > 0  # the steady state: the window's rows alerted already
        assert {"first_tick_ms", "tick_ms_median", "evaluate_cli_s", "new_terms_tick_ms_median"} <= set(r)


@needs_root
def test_short_lived_quick() -> None:
    doc = _run("short_lived.py")
    assert doc["bench"] == "short_lived"
    assert set(doc["variants"]) == {"touch-uwsgi", "dash-nginx"}
    for v in doc["variants"].values():
        assert {"n", "attributed", "rate", "missing", "wrong_executable"} <= set(v)
    assert {"seen", "matched", "overflows", "dropped"} <= set(doc["agent_counters"])


@needs_root
def test_burst_quick() -> None:
    doc = _run("burst.py")
    assert doc["bench"] == "burst"
    assert {"ratio_median", "ratios", "lost_total", "cpu_us_per_event_median", "rss_max_mb"} <= set(
        doc["summary"]
    )
    assert {"none", "agent"} == {r["mode"] for r in doc["runs"]}


@needs_root
def test_sustained_quick() -> None:
    doc = _run("sustained.py")
    assert doc["bench"] == "sustained"
    assert doc["cgroup"] in ("v1", "v2")
    run = doc["runs"]["agent"][0]
    assert {
        "events",
        "matched",
        "lost",
        "overflows",
        "cpu_us_per_event",
        "throttled_s",
        "latency_newest_ms",
    } <= set(run)
    assert run["lost"] == 0 and run["overflows"] == 0  # 500 events a second: far inside the quota
    assert run["seconds"] and {"backlog", "cpu_ms", "throttled_ms"} <= set(run["seconds"][0])


def test_collector_ingest_quick() -> None:
    doc = _run("collector_ingest.py")
    assert doc["bench"] == "collector_ingest"
    http = doc["http"]
    assert {"events_per_s", "events_committed", "events_in_db", "rss_max_sampled_mb", "rss_after_mb"} <= set(
        http
    )
    assert http["events_committed"] == http["events_in_db"] == http["events_sent"]
    assert {"events_per_s", "decode_events_per_s"} <= set(doc["in_process"])


def test_evaluate_scale_quick() -> None:
    doc = _run("evaluate_scale.py")
    assert doc["bench"] == "evaluate_scale"
    assert set(doc["shapes"]) == {"repeat", "unique", "twice"}
    for s in doc["shapes"].values():
        assert {"median_s", "first_s", "rows"} <= set(s["rows_limit100"])
        assert {"median_s", "rows"} <= set(s["cli"])
        assert s["cli"]["rows"] == s["rows_limit100"]["rows"]  # the CLI prints what the store returns
    assert doc["shapes"]["repeat"]["rows_limit100"]["rows"] == 50
    assert doc["shapes"]["twice"]["rows_qualifying"] == doc["shapes"]["twice"]["events"] // 2


@needs_root
def test_peers_quick() -> None:
    doc = _run("peers.py")
    assert doc["bench"] == "peers"
    # only what is installed runs in --quick; the rest is skipped with a reason
    assert set(doc["summary"]) | set(doc["skipped"]) == {
        "auditd",
        "fatrace",
        "bpftrace",
        "floor",
        "rarewrite",
    }
    assert {"floor", "rarewrite"} <= set(doc["summary"])
    for t in doc["summary"].values():
        assert {"ratio_median", "ratios", "seen_min", "expected", "lacks"} <= set(t)
    assert doc["summary"]["rarewrite"]["seen_min"] == doc["expected_per_run"]


def test_store_record_quick() -> None:
    doc = _run("store_record.py")
    assert doc["bench"] == "store_record"
    assert set(doc["fleets"]) == {"unique", "random", "repeat"}
    for f in doc["fleets"].values():
        want = {"record_us_per_event", "fill_us_per_event", "total_us_per_event", "cpu_us_per_event"}
        assert want <= set(f)
        assert f["events"] == f["detailed"] + f["count_times"] == f["outbox_depth"] == doc["events"]
    assert doc["fleets"]["unique"]["detailed"] == doc["events"]


@needs_root
def test_kernel_floor_quick() -> None:
    doc = _run("kernel_floor.py")
    assert doc["bench"] == "kernel_floor"
    assert set(doc["summary"]) == {"noread", "read-eager", "read-batched", "read+parse"}
    assert all(s["ratio_median"] > 0 for s in doc["summary"].values())


def test_import_rss_quick() -> None:
    doc = _run("import_rss.py")
    assert doc["bench"] == "import_rss"
    rss = doc["rss_mb"]
    assert (
        rss["requests"] > rss["interpreter"] > 0
        and rss["the agent's modules (runtime)"] >= rss["requests"] - 1
    )


def test_exceptions_cost_quick() -> None:
    doc = _run("exceptions_cost.py")
    assert doc["bench"] == "exceptions_cost"
    [size] = doc["sizes"]
    assert size["pairs"] == 1000 and size["rows"] == [100, 100]


def test_rules_cost_quick() -> None:
    doc = _run("rules_cost.py")
    assert doc["bench"] == "rules_cost"
    assert doc["records"] > 0 and doc["new_terms_hits"] > 0
    assert set(doc["ingest_records_per_s"]) == {"first", "all", "ratio"}


@needs_root
def test_flood_quick() -> None:
    """Under the unit's limits a flood never OOM-kills the agent, its folder
    is muted and reported, and a shell written elsewhere during the flood
    reaches the collector (no timing asserted: BENCHMARKS.md has the figures)."""
    doc = _run("flood.py")
    assert doc["bench"] == "flood"
    res = doc["results"]["agent"]
    assert {
        "flood_rate_per_s",
        "agent_cpu_share",
        "agent_rss_max_mb",
        "cgroup_mem_max_mb",
        "shell_alert_s",
    } <= set(res)
    assert res["agent_alive"] is True and res["oom_kills"] == 0
    assert res["flood_muted"] >= 1 and res["loss_alert"] is True  # the flooding folder: muted, alerted
    assert res["shell_stored_s"] is not None  # the shell elsewhere got through while the flood went on


def test_enrich_cost_quick() -> None:
    doc = _run("enrich_cost.py")
    assert doc["bench"] == "enrich_cost"
    assert {"facts_us", "facts_and_enrichment_us", "parts_us", "index_build_s", "ctx_bytes"} <= set(
        doc["agent"]
    )
    assert set(doc["collector"]["ms_per_alert"]) == {"plain", "enriched"}
    assert doc["agent"]["requests_in_ctx"] > 0
