"""What both agent entry points build the same way: the shipper and its
transport, from the config."""

from __future__ import annotations

from agent.sensor.outbox import AgentStore
from agent.sensor.shipper import Identity, Shipper
from agent.sensor.state_dir import StateDir
from agent.sensor.transport import HttpTransport
from agent.shared.clock import Clock
from agent.shared.config.schema import Config
from agent.shared.errors import RarewriteError


def _secret_ok(secret: str) -> str:
    if not secret:
        raise RarewriteError(
            "no enrollment secret: set RAREWRITE_ENROLLMENT_SECRET, --enrollment-secret, "
            "or [agent] enrollment_secret_file"
        )
    return secret


def build_shipper(
    cfg: Config, state: StateDir, store: AgentStore, ident: Identity, secret: str, clock: Clock
) -> Shipper:
    a = cfg.agent
    if not a.collector:
        raise RarewriteError("no collector URL: give --collector or [agent] collector")
    transport = HttpTransport(a.request_timeout_ms / 1000, a.ca_bundle, a.client_cert, a.client_key, a.proxy)
    return Shipper(
        store, transport, a.collector, state.path, ident, _secret_ok(secret), clock,
        a.batch_max_records, a.backoff_max_ms / 1000,
    )  # fmt: skip
