"""Drives the real `pulsar-relay-client` (RelayTransport) against a running relay, losing the
first response(s) after the relay answered them, so the client retries a publish the relay
has already stored. Run by tests/idempotency.rs with the client's venv python.

Usage: client_retry.py RELAY_URL TOPIC single|bulk LOSE
  LOSE: how many responses to lose (each one makes the client retry with the same key).
Prints one JSON object on stdout: {"result": <the client's return value>,
"keys": [<Idempotency-Key of every attempt>], "statuses": [<HTTP status of every attempt>]}.
"""

import json
import sys
import warnings

import requests

warnings.simplefilter("ignore", RuntimeWarning)  # pulsar_relay_client.testing warns on import
from pulsar_relay_client import RelayTransport  # noqa: E402
from pulsar_relay_client.testing import FakeAuthManager  # noqa: E402


class LosingSession(requests.Session):
    """Sends every request for real, then pretends the first `lose` responses never arrived
    (a connection cut after the relay answered): the case idempotency keys exist for."""

    def __init__(self, lose):
        super().__init__()
        self.lose = lose
        self.keys = []
        self.statuses = []

    def send(self, request, **kwargs):
        self.keys.append(request.headers.get("Idempotency-Key"))
        response = super().send(request, **kwargs)
        self.statuses.append(response.status_code)
        if self.lose > 0:
            self.lose -= 1
            raise requests.ConnectionError("test: response lost after the relay answered")
        return response


def main():
    url, topic, mode, lose = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    session = LosingSession(lose)
    transport = RelayTransport(
        url,
        auth_manager=FakeAuthManager(),
        session=session,
        sleep=lambda _seconds: None,
        timeout=10,
    )
    if mode == "single":
        result = transport.post_message(topic, {"order": 1}, metadata={"source": "client"})
    elif mode == "bulk":
        result = transport.post_bulk_messages(
            [{"topic": topic, "payload": {"item": i}} for i in range(3)]
        )
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps({"result": result, "keys": session.keys, "statuses": session.statuses}))


if __name__ == "__main__":
    main()
