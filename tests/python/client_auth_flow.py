"""Drives the real `pulsar-relay-client` 0.2.2 through a whole authenticated session against a
running relay, as Galaxy and Pulsar use it: password login (saving the refresh token as
`pulsar-config --login` does), topic creation twice (the second through the client's
"exists → /auth/me → GET topic owner" check), single and bulk publishes whose first response
is lost (so the client retries with its Idempotency-Key), long-poll with cursors, history
paging, and a later process logging in from the saved refresh token. Run by
tests/auth_python_client.rs with the client's venv python.

Usage: client_auth_flow.py RELAY_URL ADMIN_USER ADMIN_PASSWORD WORKDIR
Prints one JSON object on stdout with what each step saw; the Rust test asserts on it.
"""

import json
import os
import sys
import warnings

import requests

warnings.simplefilter("ignore", RuntimeWarning)
from pulsar_relay_client import (  # noqa: E402
    CredentialsFile,
    HttpRelayClient,
    RelayTransport,
    TopicOwnershipConflictError,
    build_auth_manager,
)


class LosingSession(requests.Session):
    """Sends every request for real, then drops the next `lose` responses to publishes (a
    connection cut after the relay answered): the client must retry with the same key."""

    def __init__(self):
        super().__init__()
        self.lose = 0
        self.keys = []

    def send(self, request, **kwargs):
        response = super().send(request, **kwargs)
        if "/api/v1/messages" in request.url:
            self.keys.append(request.headers.get("Idempotency-Key"))
            if self.lose > 0:
                self.lose -= 1
                raise requests.ConnectionError("test: response lost after the relay answered")
        return response


def register(url, admin_token, username, password, permissions):
    r = requests.post(
        f"{url}/auth/register",
        json={"username": username, "password": password, "permissions": permissions},
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=10,
    )
    return r.status_code


def main():
    url, admin_user, admin_password, workdir = sys.argv[1:5]
    report = {}
    admin = build_auth_manager(url, username=admin_user, password=admin_password)
    admin_token = admin.get_token()
    report["register"] = register(url, admin_token, "producer", "producer-pass", ["read", "write"])
    report["register_again"] = register(url, admin_token, "producer", "producer-pass", ["read"])
    report["register_other"] = register(url, admin_token, "other", "other-pass1", ["read", "write"])

    creds_path = os.path.join(workdir, "relay_credentials.json")
    auth = build_auth_manager(
        url, username="producer", password="producer-pass", credentials_file=creds_path
    )
    report["strategy"] = auth.strategy_name
    token = auth.get_token()
    report["credentials_saved"] = os.path.exists(creds_path)
    first_refresh = CredentialsFile(creds_path).load()["refresh_token"]

    client = HttpRelayClient(url)
    client.create_or_verify_topic(token, "jobs")
    client.create_or_verify_topic(token, "jobs")  # exists: verified as ours
    report["topic_verified_twice"] = True

    session = LosingSession()
    transport = RelayTransport(url, auth_manager=auth, session=session, sleep=lambda _s: None, timeout=10)
    session.lose = 1
    first = transport.post_message("jobs", {"n": 0})
    report["single"] = first
    report["single_keys"] = session.keys[:]
    session.keys.clear()
    session.lose = 1
    bulk = transport.post_bulk_messages(
        [{"topic": "jobs", "payload": {"n": n}} for n in range(1, 6)]
    )
    report["bulk"] = bulk
    report["bulk_keys"] = session.keys[:]

    # A consumer that starts from the beginning of the topic (a poll with no cursor at all is
    # live-only, in the Python relay as here).
    transport.set_last_message_id("jobs", "0-0")
    polled = transport.long_poll(["jobs"], timeout=2)
    report["poll1"] = [m["message_id"] for m in polled]
    report["poll1_topics"] = sorted({m["topic"] for m in polled})
    after = transport.post_message("jobs", {"n": 6})
    polled = transport.long_poll(["jobs"], timeout=2)
    report["poll2"] = [m["message_id"] for m in polled]
    report["after"] = after["message_id"]

    pages, cursor = [], None
    while True:
        page = client.fetch_messages(auth.get_token(), "jobs", limit=2, order="asc", cursor=cursor)
        if not page["messages"]:
            break
        pages.append([m["message_id"] for m in page["messages"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    report["history_pages"] = pages

    # A later process: the saved refresh token logs in (and is rotated).
    later = build_auth_manager(url, credentials_file=creds_path)
    report["later_strategy"] = later.strategy_name
    later_token = later.get_token()
    report["later_me"] = client.whoami(later_token)["username"]
    # The spent refresh token, replayed: refused, and its whole chain with it.
    replay = requests.post(f"{url}/auth/token/refresh", json={"refresh_token": first_refresh}, timeout=10)
    report["replay_status"] = replay.status_code
    rotated = CredentialsFile(creds_path).load()["refresh_token"]
    after_replay = requests.post(f"{url}/auth/token/refresh", json={"refresh_token": rotated}, timeout=10)
    report["chain_after_replay_status"] = after_replay.status_code
    report["rotated"] = CredentialsFile(creds_path).load()["refresh_token"] != first_refresh

    # Another user: its own `jobs`, none of the producer's messages.
    other = build_auth_manager(url, username="other", password="other-pass1")
    other_token = other.get_token()
    client.create_or_verify_topic(other_token, "jobs")
    report["other_history"] = client.fetch_messages(other_token, "jobs", limit=10)["messages"]
    try:
        # The producer's topic is not the other user's: its own namespace has no `elsewhere`.
        client.create_or_verify_topic(other_token, "jobs")
        report["other_verify"] = "ok"
    except TopicOwnershipConflictError as e:
        report["other_verify"] = f"conflict: {e}"
    print(json.dumps(report))


if __name__ == "__main__":
    main()
