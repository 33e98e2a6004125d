"""Operations: Prometheus metrics over several workers, readiness during drain, JSON logs,
TURN credentials (checked against an independent HMAC and a real coturn when installed)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server, free_port
from signing import Identity
from volli import turn
from workers import spread_users, worker_of


def scrape(srv: Server, token: str | None = None) -> dict[tuple[str, tuple], float]:
    request = urllib.request.Request(f"http://127.0.0.1:{srv.port}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_add_up_over_two_workers(tmp_path, redis, open_client):
    srv = Server(tmp_path, {"VOLLI_REDIS_URL": redis.url, "WEB_CONCURRENCY": "2",
                            "VOLLI_DISCOVER_PER_MINUTE": "3"}).wait_ready()
    try:
        reps, pids = spread_users([srv], open_client, workers_total=2)
        users = list(reps)  # one user on each worker
        a, b = reps[users[0]], reps[users[1]]
        signer = open_client(srv)
        Identity().register(signer, "signed@volli.app")
        for n in range(5):
            a.send({"type": "offer", "to": users[1], "offer": {"n": n}})
            assert b.recv()["offer"] == {"n": n}
        for _ in range(3):
            assert a.request({"type": "nonsense"})["code"] == "unknown-type"
        for n in range(4):  # the 4th is over the limit of 3 per minute
            a.call({"type": "discover", "userId": f"x{n}"})
        registered = len(pids) + 1
        # Per-message counters reach Prometheus within METRICS_FLUSH (1 s) in the other
        # worker; the worker answering a scrape flushes its own first.
        deadline = time.monotonic() + 5
        while value(scrape(srv), "volli_relay_latency_seconds_count") != 5:
            assert time.monotonic() < deadline, scrape(srv)
            time.sleep(0.2)
        time.sleep(1.5)  # both workers have flushed everything
        # Any worker may answer a scrape: each must report the sum over both.
        for _ in range(6):
            samples = scrape(srv)
            assert value(samples, "volli_connections") == registered
            assert value(samples, "volli_registered_users") == registered
            assert value(samples, "volli_messages_relayed_total", type="offer") == 5
            assert value(samples, "volli_relay_latency_seconds_count") == 5
            assert value(samples, "volli_errors_total", code="unknown-type") == 3
            assert value(samples, "volli_errors_total", code="rate-limited") == 1
            assert value(samples, "volli_refused_total", reason="discover-rate") == 1
            assert value(samples, "volli_registrations_total", signed="true") == 1
            assert value(samples, "volli_registrations_total", signed="false") == len(pids)
            assert value(samples, "volli_messages_received_total", type="register") == registered
        # A killed worker's live gauges go; its counters stay.
        everyone = worker_of([srv])  # now including signed@volli.app
        assert len(everyone) == registered
        victim = everyone[users[0]]
        on_victim = sum(1 for pid in everyone.values() if pid == victim)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while value(scrape(srv), "volli_connections") != registered - on_victim:
            assert time.monotonic() < deadline, scrape(srv)
            time.sleep(0.2)
        samples = scrape(srv)
        assert value(samples, "volli_registered_users") == registered - on_victim
        assert value(samples, "volli_messages_relayed_total", type="offer") == 5
    finally:
        srv.stop()


def test_metrics_bearer_token(make_server):
    srv = make_server({"VOLLI_METRICS_TOKEN": "s3cret"})
    with pytest.raises(urllib.error.HTTPError) as info:
        scrape(srv)
    assert info.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        scrape(srv, token="wrong")
    assert value(scrape(srv, token="s3cret"), "volli_connections") == 0


def test_ready_turns_false_while_draining(make_server, clients):
    srv = make_server()
    holder = clients(srv.url)  # keeps the worker draining for a moment
    holder.register("holder@volli.app")
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("GET", "/ready")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["ready"] is True
    srv.signal(signal.SIGTERM)
    srv.wait_log("drained:")
    conn.request("GET", "/ready")  # the same keep-alive connection, after SIGTERM
    response = conn.getresponse()
    assert response.status == 503
    body = json.loads(response.read())
    assert body["ready"] is False and body["reason"] == "draining"


def test_json_logs_carry_user_and_ip_but_no_sdp(make_server, clients):
    srv = make_server({"VOLLI_LOG_FORMAT": "json"})
    a, b = clients(srv.url), clients(srv.url)
    a.register("alice@volli.app")
    b.register("bob@volli.app")
    a.send({"type": "offer", "to": "bob@volli.app", "offer": {"sdp": "v=0 SECRET-SDP"}})
    assert b.recv()["offer"]["sdp"] == "v=0 SECRET-SDP"
    a.close()
    srv.wait_log("connection closed")
    records = [json.loads(line) for line in srv.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    loggers = {record["logger"] for record in records}
    assert {"gunicorn.error", "volli.ws", "volli.hub"} <= loggers
    messages = [record["message"] for record in records]
    assert any("registered user=alice@volli.app" in m and "ip=127.0.0.1" in m for m in messages)
    assert not any(m.startswith("connection open") for m in messages)  # DEBUG only
    assert any("connection closed" in m and "user=alice@volli.app" in m for m in messages)
    assert "SECRET-SDP" not in srv.log()


# --- TURN credentials -------------------------------------------------------------------


def test_turn_credential_matches_an_independent_hmac():
    username = "1700000000:alice@volli.app"
    expected = subprocess.run(
        ["openssl", "dgst", "-sha1", "-hmac", "north-wind", "-binary"],
        input=username.encode(), capture_output=True, check=True).stdout
    assert turn.credential("north-wind", username) == base64.b64encode(expected).decode()
    assert turn.credential("north-wind", username) == "FM7PB0eZc+NJqhbtZL5JusDbWvQ="
    servers = turn.ice_servers("north-wind", ["stun:s.example:3478", "turn:t.example:3478"],
                               "alice@volli.app", 600, 1699999400.7)
    assert servers == [{"urls": ["stun:s.example:3478"]},
                       {"urls": ["turn:t.example:3478"], "username": username,
                        "credential": "FM7PB0eZc+NJqhbtZL5JusDbWvQ="}]


def test_ice_servers_on_register_and_on_request(make_server, clients):
    srv = make_server({"VOLLI_TURN_SECRET": "north-wind", "VOLLI_TURN_TTL": "600",
                       "VOLLI_TURN_URIS": "turn:127.0.0.1:3478,turns:t.example:5349"})
    c = clients(srv.url)
    assert Identity().register(c, "alice@volli.app")["type"] == "registered"  # TURN: signed
    pushed = c.recv()
    assert pushed["type"] == "ice-servers"
    [server] = pushed["iceServers"]
    assert server["urls"] == ["turn:127.0.0.1:3478", "turns:t.example:5349"]
    expiry, user = server["username"].split(":", 1)
    assert user == "alice@volli.app" and 590 < int(expiry) - time.time() <= 600
    assert server["credential"] == turn.credential("north-wind", server["username"])
    reply = c.call({"type": "ice-servers"})
    assert reply["iceServers"][0]["urls"] == server["urls"]
    plain = make_server()
    other = clients(plain.url)
    assert other.request({"type": "ice-servers"})["code"] == "not-registered"
    other.register("bob@volli.app")
    assert other.request({"type": "ice-servers"}) == {"type": "ice-servers", "iceServers": []}


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_credentials_allocate_on_a_real_coturn(make_server, clients, tmp_path):
    if shutil.which("turnserver") is None:
        pytest.fail("coturn is not installed: run the suite with `bash tests/run.sh`")
    port = free_port()
    turn_log = tmp_path / "turnserver.log"
    server = subprocess.Popen(
        ["turnserver", "-n", "--use-auth-secret", "--static-auth-secret=north-wind",
         "--realm=volli.test", "--listening-ip=127.0.0.1", f"--listening-port={port}",
         "--relay-ip=127.0.0.1", "--min-port=49152", "--max-port=49200", "--no-cli",
         "--no-tls", "--no-dtls", "--allow-loopback-peers", "--log-file=stdout",
         "--simple-log"], stdout=open(turn_log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        srv = make_server({"VOLLI_TURN_SECRET": "north-wind",
                           "VOLLI_TURN_URIS": f"turn:127.0.0.1:{port}"})
        c = clients(srv.url)
        assert Identity().register(c, "alice@volli.app")["type"] == "registered"
        server_entry = c.recv()["iceServers"][0]
        peer_port = _udp_port()
        peer = subprocess.Popen(["turnutils_peer", "-L", "127.0.0.1", "-p", str(peer_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            time.sleep(0.5)

            def allocate(password: str) -> subprocess.CompletedProcess:
                return subprocess.run(
                    ["turnutils_uclient", "-u", server_entry["username"], "-w", password,
                     "-p", str(port), "-e", "127.0.0.1", "-r", str(peer_port), "-n", "3",
                     "-m", "1", "-l", "100", "-X", "127.0.0.1"],
                    capture_output=True, text=True, timeout=30)

            good = allocate(server_entry["credential"])
            out = good.stdout + good.stderr
            assert good.returncode == 0, out
            assert "Total lost packets 0" in out, out
            bad = allocate(turn.credential("wrong-secret", server_entry["username"]))
            assert bad.returncode != 0 or "401" in bad.stdout + bad.stderr
        finally:
            os.killpg(peer.pid, signal.SIGTERM)
            peer.wait(timeout=5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


def test_batched_latency_counts_match_histogram_observe():
    """Metrics.flush writes into the histogram's own buckets: the result must be what
    Histogram.observe would give, bounds included."""
    from prometheus_client import CollectorRegistry, Histogram

    from volli.metrics import LATENCY_BOUNDS, RELAY_LATENCY, Metrics

    reference = Histogram("reference_seconds", "x", buckets=LATENCY_BOUNDS,
                          registry=CollectorRegistry())
    before = [bucket.get() for bucket in RELAY_LATENCY._buckets]
    sum_before = RELAY_LATENCY._sum.get()
    metrics = Metrics()
    observed = [0.0, 0.00005, *LATENCY_BOUNDS, 0.0003, 0.07, 0.6, 12.0]
    for seconds in observed:
        metrics.relayed("offer", seconds)
        reference.observe(seconds)
    assert metrics["relayed"] == len(observed)  # reading a total flushes
    after = [bucket.get() - b for bucket, b in zip(RELAY_LATENCY._buckets, before)]
    assert after == [bucket.get() for bucket in reference._buckets]
    assert RELAY_LATENCY._sum.get() - sum_before == pytest.approx(reference._sum.get())

