"""Alerts POSTed one by one as JSON to a webhook."""

from __future__ import annotations

from typing import Any

import requests

from agent import __version__
from agent.collector.outputs.base import Permanent, QueuedOutput, Retry
from agent.collector.outputs.stdout import alert_field
from agent.shared.backoff import retry_after
from agent.shared.text import dumps, url_for_logs


class WebhookOutput(QueuedOutput):
    """One alert per ``POST url``: body the alert document as JSON
    (``Content-Type: application/json``), header ``X-Rarewrite-Alert-Id`` the
    alert id (stable: a receiver can deduplicate), plus ``secret_header:
    <secret>`` when configured. 2xx is delivered; a connection error, a
    timeout, 408, 429 and 5xx are retried (Retry-After honoured, up to an
    hour); any other status (and a redirect, never followed, so the secret
    header never travels elsewhere) is a refusal: logged, counted in
    ``failed``, skipped. TLS is verified (the system store, or ``ca_bundle``)."""

    kind = "webhook"

    def __init__(
        self,
        url: str,
        name: str = "webhook",
        secret_header: str = "",
        secret: str = "",
        timeout_s: float = 10.0,
        queue_max: int = 10_000,
        backoff_max_s: float = 60.0,
        ca_bundle: str = "",
    ) -> None:
        if secret and ("\r" in secret or "\n" in secret or "\0" in secret):
            raise ValueError("the webhook secret must be one line")
        self.url = url
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._session.headers.update(
            {"Content-Type": "application/json", "User-Agent": f"rarewrite-collector/{__version__}"}
        )
        if secret_header:
            self._session.headers[secret_header] = secret
        self._verify: Any = ca_bundle or True
        super().__init__(name, queue_max, backoff_max_s)

    def __repr__(self) -> str:  # never the headers: one holds the secret
        return f"WebhookOutput(name={self.name!r}, url={url_for_logs(self.url)!r})"

    def deliver(self, alert: dict[str, Any]) -> None:
        body = dumps(alert).encode("ascii")
        alert_id = alert_field(alert, "kibana", "alert", "uuid")
        headers = {"X-Rarewrite-Alert-Id": str(alert_id)} if alert_id else {}
        try:
            r = self._session.post(
                self.url,
                data=body,
                headers=headers,
                timeout=self.timeout_s,
                verify=self._verify,
                allow_redirects=False,
            )
        except requests.RequestException as e:
            raise Retry(f"{type(e).__name__}: {e}") from None
        with r:
            if 200 <= r.status_code < 300:
                return
            if r.status_code in (408, 429) or r.status_code >= 500:
                raise Retry(f"HTTP {r.status_code}", retry_after(r.headers, self._clock.now_ms() / 1000))
            raise Permanent(f"HTTP {r.status_code}")

    def disconnect(self) -> None:
        self._session.close()
