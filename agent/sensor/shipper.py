"""Enroll with the collector, send the outbox, back off, ack.

Delivery is at-least-once with exactly-once effect: a batch leaves the
outbox only after a 2xx, and its bytes (seq and batch id included) never
change once formed, so a resend after a crash is a duplicate by name at the
collector. TLS is verified by default and a TLS failure is a failure like
any other: there is no fallback to plain HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from agent.sensor.outbox import AgentStore
from agent.sensor.transport import USER_AGENT, Transport
from agent.shared.backoff import Backoff, retry_after
from agent.shared.clock import Clock
from agent.shared.errors import EnrollError, ShipError

log = logging.getLogger("rarewrite.shipper")
MAX_ACTIONS = 100  # actions taken from one answer (a collector sends 20 at most)
BUSY_WAIT_S = 1.0  # the longest the shipper holds back for a busy reader before it sends one batch
# (a flood keeps the reader busy for as long as the attacker likes: the shell behind it must still leave)


@dataclass(frozen=True)
class Identity:
    agent_id: str
    host_name: str


class Shipper:
    """Moves the outbox to the collector. ``ship_once`` is one step, ``run``
    loops until told to stop."""

    def __init__(
        self,
        store: AgentStore,
        transport: Transport,
        collector_url: str,
        state_dir: str,
        identity: Identity,
        secret: str,
        clock: Clock,
        batch_max_records: int = 5000,
        backoff_max_s: float = 300.0,
    ) -> None:
        self.store = store
        self.transport = transport
        self.url = collector_url.rstrip("/")
        self.key_path = os.path.join(state_dir, "api_key")
        self.identity = identity
        self.secret = secret
        self.clock = clock
        self.batch_max = batch_max_records
        self.backoff = Backoff(cap=backoff_max_s)
        self.not_before = 0.0  # monotonic time before which nothing is sent
        self.reachable: Optional[bool] = None
        self.last_success_ms: Optional[int] = None
        self.last_error: Optional[str] = None
        self.counters = {
            "batches_sent": 0,
            "records_sent": 0,
            "duplicates": 0,
            "refused": 0,
            "failures": 0,
            "epoch_resets": 0,
            "heartbeats": 0,
            "heartbeat_failures": 0,
        }
        self._key: Optional[str] = None
        self._proof: Optional[str] = None  # our last key: shown when enrolling again
        self._sending = threading.Lock()
        # heartbeats: what to report (None: no heartbeats, e.g. a replay) and how often
        self.health: Optional[Callable[[], dict[str, Any]]] = None
        self.heartbeat_s = 30.0
        # what the collector asks of this agent (quarantine actions), from its answers
        self.on_actions: Optional[Callable[[list[dict[str, Any]]], None]] = None
        self.next_beat = 0.0

    # -------------------------------------------------------------- enrollment

    def api_key(self) -> str:
        if self._key is None:
            self._key = self._load_key() or self.enroll()
        return self._key

    def _load_key(self) -> Optional[str]:
        try:
            with open(self.key_path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        key = doc.get("api_key")
        if not isinstance(key, str):
            return None
        if doc.get("agent_id") != self.identity.agent_id:
            return None  # a new identity enrolls anew
        if doc.get("host_name") != self.identity.host_name:
            self._proof = key  # the same agent renamed: enroll again, proving it is us
            return None
        return key

    def enroll(self) -> str:
        """POST /api/v1/enroll; the key is kept in the state dir, mode 0600."""
        body = json.dumps(
            {
                "enrollment_secret": self.secret,
                "agent_id": self.identity.agent_id,
                "host_name": self.identity.host_name,
            }
        ).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if self._proof:  # replacing our own key needs it (a stolen fleet secret alone cannot)
            headers["Authorization"] = f"Bearer {self._proof}"
        try:
            r = self.transport.post(self.url + "/api/v1/enroll", body, headers)
        except ShipError:
            self.reachable = False
            raise
        self.reachable = True
        if r.status == 403:
            raise EnrollError("the collector refused enrollment (HTTP 403): this agent id was revoked")
        if r.status == 401:
            raise EnrollError(
                "the collector refused enrollment (HTTP 401): check the enrollment secret or token"
            )
        if r.status == 409:
            raise EnrollError(
                f"the collector refused enrollment (HTTP 409): agent id {self.identity.agent_id!r} is "
                "enrolled with another key and this state dir does not hold it; an admin must run "
                f"'rarewrite collector agents reset {self.identity.agent_id}' (or give a token bound to it)"
            )
        if r.status != 200:
            raise ShipError(f"enrollment failed: HTTP {r.status}")
        try:
            key = json.loads(r.body)["api_key"]
            if not isinstance(key, str) or not key:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ShipError("enrollment reply holds no api_key") from None
        tmp = self.key_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {"agent_id": self.identity.agent_id, "host_name": self.identity.host_name, "api_key": key}, f
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.key_path)
        self._proof = None
        log.info("event=enrolled agent_id=%s host_name=%r", self.identity.agent_id, self.identity.host_name)
        return key

    # -------------------------------------------------------------- shipping

    def ship_once(self) -> bool:
        """Send one batch if there is one and the backoff allows; True when a
        batch was acknowledged. EnrollError propagates (fatal). One send at a
        time: the shutdown flush may run while the shipper thread still waits
        for an answer."""
        with self._sending:
            return self._ship_once()

    def _ship_once(self) -> bool:
        if self.clock.monotonic() < self.not_before:
            return False
        lease = self.store.lease(
            self.identity.agent_id, self.identity.host_name, self.store.next_batch_limit(self.batch_max)
        )
        if lease is None:
            return False
        try:
            headers = {
                "Content-Type": "application/msgpack",
                "Authorization": f"Bearer {self.api_key()}",
                "User-Agent": USER_AGENT,
            }
            r = self.transport.post(self.url + "/api/v1/batches", lease.body, headers)
        except EnrollError:
            raise
        except ShipError as e:
            # with no key yet the error came from enroll(), which set reachable itself
            self._failed(str(e), None, reached=False if self._key is not None else None)
            return False
        if 200 <= r.status < 300:
            self.store.ack(lease)
            self.backoff.reset()
            self.reachable, self.last_error = True, None
            self.last_success_ms = self.clock.now_ms()
            self.counters["batches_sent"] += 1
            self.counters["records_sent"] += lease.n
            if b"duplicate" in r.body:
                self.counters["duplicates"] += 1
            self._take_actions(r.body)
            return True
        self.reachable = True
        if r.status == 401:  # key unknown or revoked: enroll again (osquery's node_invalid)
            self._proof, self._key = self._key, None
            try:
                os.unlink(self.key_path)
            except FileNotFoundError:
                pass
            self._failed("collector does not know our key; enrolling again", None)
        elif r.status == 409:  # our seq was used by another batch: a new epoch, the same rows again
            self.counters["epoch_resets"] += 1
            self.store.new_epoch(lease, r.body[:300].decode("utf-8", "replace"))
        elif r.status in (400, 413):
            reason = r.body[:300].decode("utf-8", "replace")
            self.counters["refused"] += 1
            log.warning(
                "event=batch_refused status=%d seq=%d records=%d reason=%r",
                r.status,
                lease.seq,
                lease.n,
                reason,
            )
            self.store.split(lease, f"HTTP {r.status}: {reason}")
        else:
            self._failed(f"HTTP {r.status}", retry_after(r.headers, self.clock.now_ms() / 1000))
        return False

    def _failed(self, why: str, wait: Optional[float], reached: Optional[bool] = None) -> None:
        self.counters["failures"] += 1
        if reached is not None:  # said by the caller, never guessed from the error text
            self.reachable = reached
        delay = wait if wait is not None else self.backoff.next_delay()
        if wait is not None:
            self.backoff.failures += 1
        self.not_before = self.clock.monotonic() + delay
        if why != self.last_error:
            log.warning("event=ship_failed error=%r retry_in=%.1fs", why, delay)
        self.last_error = why

    def run(
        self, stop: threading.Event, interval: float = 1.0, busy: Optional[threading.Event] = None
    ) -> None:
        """Ship until ``stop`` is set; a fatal EnrollError ends the loop.

        While ``busy`` is set (the reader is in a burst) the loop waits, at
        most BUSY_WAIT_S at a time, so that it does not take the GIL from
        the reader: the events are safe in the outbox and leave right after.
        """
        held = 0.0
        while not stop.is_set():
            self._maybe_beat()
            if busy is not None and busy.is_set() and held < BUSY_WAIT_S:
                stop.wait(0.1)
                held += 0.1
                continue
            held = 0.0
            try:
                if self._key is None and self.clock.monotonic() >= self.not_before:
                    self.api_key()  # enroll now, not at the first event: a wrong secret fails at start
                shipped = False
                while self.ship_once() and not stop.is_set():
                    shipped = True
                    if busy is not None and busy.is_set():
                        break
                if shipped and self.store.depth() == 0:
                    self.store.shrink_connection()  # all sent: this thread's page cache can go
            except EnrollError:
                raise
            except ShipError as e:
                self._failed(str(e), None)
            except Exception as e:
                log.exception("event=shipper_error error=%r", str(e))
                self._failed(str(e), None)
            stop.wait(max(0.05, min(interval, self.not_before - self.clock.monotonic())))

    def _maybe_beat(self) -> None:
        """A heartbeat when one is due: the collector alerts an agent it does
        not hear from, so a killed or stuck agent is noticed."""
        now = self.clock.monotonic()
        if self.health is None or self._key is None or now < self.next_beat:
            return
        self.next_beat = now + self.heartbeat_s
        body = json.dumps({"sent_at": self.clock.now_ms(), **self.health()}).encode()
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self._key}",
            "User-Agent": USER_AGENT,
        }
        try:
            r = self.transport.post(self.url + "/api/v1/heartbeat", body, headers)
        except ShipError as e:
            self.counters["heartbeat_failures"] += 1
            log.debug("event=heartbeat_failed error=%r", str(e))
            return
        if 200 <= r.status < 300:
            self.counters["heartbeats"] += 1
            self._take_actions(r.body)
        else:
            self.counters["heartbeat_failures"] += 1
            log.debug("event=heartbeat_refused status=%d", r.status)

    def _take_actions(self, body: bytes) -> None:
        """The ``actions`` of a collector's answer, to ``on_actions``; an answer
        that is not what a collector sends is ignored (the batch is acked)."""
        if b'"notes": true' in body or b'"notes":true' in body:
            self.store.notes_ok = True  # a collector that takes notes (an older one refuses some batches)
        if self.on_actions is None or b'"actions"' not in body:
            return
        try:
            actions = json.loads(body).get("actions")
        except Exception:  # noqa: BLE001 - any odd answer (too deep, not an object) is ignored
            log.warning("event=answer_not_understood bytes=%d", len(body))
            return
        if isinstance(actions, list):
            self.on_actions([a for a in actions[:MAX_ACTIONS] if isinstance(a, dict)])

    def drain(self, deadline_s: float) -> bool:
        """Ship until the outbox is empty or the monotonic deadline passes."""
        while self.clock.monotonic() < deadline_s:
            if self.store.depth() == 0:
                return True
            if not self.ship_once():
                wait = max(
                    0.05, min(self.not_before - self.clock.monotonic(), deadline_s - self.clock.monotonic())
                )
                self.clock.sleep(min(wait, 1.0))
        return self.store.depth() == 0
