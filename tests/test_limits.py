"""Abuse limits: per connection (messages, fan-out, discover), per client IP (open
connections, attempts), trusted proxies and the Origin allow-list."""

from __future__ import annotations

import ipaddress
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import PERMISSIVE_LIMITS
from volli.limits import AddressLimits, DistinctInWindow, TokenBucket
from volli.transport.client_ip import client_ip

# --- the arithmetic, without a server -------------------------------------------------


def test_token_bucket():
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0  # one token back after 1/rate seconds
    assert bucket.full(10)


def test_distinct_targets_in_a_window():
    window = DistinctInWindow(limit=2, window=60)
    assert window.allow("a", 0) == 0 and window.allow("b", 1) == 0
    assert window.allow("a", 2) == 0  # a known target is always fine
    assert window.allow("c", 3) == pytest.approx(58)  # "b" (seen at 1) frees first, at 61
    assert window.allow("c", 61) == 0


def test_address_limits():
    limits = AddressLimits(max_connections=2, connect_rate=1)
    assert limits.admit("1.1.1.1", 0) is None and limits.admit("1.1.1.1", 0) is None
    assert limits.admit("1.1.1.1", 0) == "ip-rate"  # burst of 2 used up
    assert limits.admit("1.1.1.1", 5) == "ip-connections"
    limits.release("1.1.1.1")
    assert limits.admit("1.1.1.1", 10) is None
    assert limits.admit("2.2.2.2", 10) is None


def nets(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize("trusted,peer,forwarded,expected", [
    (0, "10.0.0.1", "6.6.6.6", "10.0.0.1"),  # nobody trusted: header ignored
    (1, "10.0.0.1", "6.6.6.6, 7.7.7.7", "7.7.7.7"),  # one hop: the last entry
    (2, "10.0.0.1", "6.6.6.6, 7.7.7.7", "6.6.6.6"),
    (3, "10.0.0.1", "7.7.7.7", "10.0.0.1"),  # fewer hops than trusted: the socket
    (nets("10.0.0.0/8"), "10.0.0.1", "6.6.6.6, 10.0.0.9", "6.6.6.6"),
    (nets("10.0.0.0/8"), "8.8.8.8", "6.6.6.6", "8.8.8.8"),  # peer is not a proxy
    (nets("10.0.0.0/8"), "10.0.0.1", "1.2.3.4, 6.6.6.6", "6.6.6.6"),  # spoofed left part
])
def test_client_ip(trusted, peer, forwarded, expected):
    environ = {"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}
    assert client_ip(environ, trusted) == expected


# --- against a real server ------------------------------------------------------------


def limited(**env: str) -> dict[str, str]:
    return {**PERMISSIVE_LIMITS, **env}


def test_message_rate_then_close_on_sustained_abuse(make_server, clients):
    srv = make_server(limited(VOLLI_RATE_MESSAGES="1", VOLLI_RATE_BURST="5",
                              VOLLI_RATE_ABUSE_CLOSE="10"))
    c = clients(srv.url)
    for _ in range(8):
        c.send({"type": "ping"})
    replies = [c.recv() for _ in range(8)]
    assert replies[:5] == [{"type": "pong"}] * 5
    for reply in replies[5:]:
        assert reply["code"] == "rate-limited" and reply["limit"] == "message-rate"
        assert 0 < reply["retryAfter"] <= 1
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(20):
            c.send({"type": "ping"})
            c.recv()
    assert info.value.rcvd.code == 4029
    assert "kept sending while rate-limited" in srv.log()
    assert clients(srv.url).request({"type": "ping"}) == {"type": "pong"}  # others unaffected


def test_fan_out_and_discover_limits(make_server, clients):
    srv = make_server(limited(VOLLI_FANOUT_PER_MINUTE="3", VOLLI_DISCOVER_PER_MINUTE="4"))
    c = clients(srv.url)
    c.register("scraper@volli.app")
    for n in range(3):
        assert c.call({"type": "offer", "to": f"t{n}@volli.app", "offer": {}})["code"] \
            == "peer-offline"
    reply = c.call({"type": "offer", "to": "t3@volli.app", "offer": {}})
    assert reply["code"] == "rate-limited" and reply["limit"] == "fan-out"
    assert reply["retryAfter"] > 50
    assert c.call({"type": "offer", "to": "t0@volli.app", "offer": {}})["code"] == "peer-offline"
    for n in range(4):
        assert c.call({"type": "discover", "userId": f"d{n}"})["type"] == "discover-response"
    reply = c.call({"type": "discover", "userId": "d4"})
    assert reply["code"] == "rate-limited" and reply["limit"] == "discover-rate"


def test_open_connections_per_ip_get_429(make_server, clients):
    srv = make_server(limited(VOLLI_IP_MAX_CONNECTIONS="2"))
    first, _ = clients(srv.url), clients(srv.url)
    with pytest.raises(InvalidStatus) as info:
        clients(srv.url)
    assert info.value.response.status_code == 429
    assert b"too many open connections" in info.value.response.body
    first.close()
    for _ in range(50):  # the slot frees when the server has seen the close
        try:
            clients(srv.url)
            break
        except InvalidStatus:
            time.sleep(0.1)
    else:
        pytest.fail("slot not freed")
    assert srv.http("/health")[0] == 200


def test_connection_attempts_per_ip_get_429(make_server, clients):
    srv = make_server(limited(VOLLI_IP_CONNECT_RATE="0.5"))  # burst of 1
    clients(srv.url)
    with pytest.raises(InvalidStatus) as info:
        clients(srv.url)
    assert info.value.response.status_code == 429
    assert b"too many connection attempts" in info.value.response.body


@pytest.mark.parametrize("trusted", ["1", "127.0.0.0/8"])
def test_forwarded_for_is_the_client_only_behind_trusted_proxies(make_server, clients, trusted):
    srv = make_server(limited(VOLLI_IP_MAX_CONNECTIONS="1", VOLLI_TRUSTED_PROXIES=trusted))
    clients(srv.url, additional_headers={"X-Forwarded-For": "198.51.100.1"})
    second = clients(srv.url, additional_headers={"X-Forwarded-For": "198.51.100.2"})
    with pytest.raises(InvalidStatus):
        clients(srv.url, additional_headers={"X-Forwarded-For": "198.51.100.2"})
    second.register(f"forwarded-{trusted}@volli.app")
    srv.wait_log("ip=198.51.100.2")  # the `registered` line names the client IP


def test_forwarded_for_is_ignored_without_trusted_proxies(make_server, clients):
    srv = make_server(limited(VOLLI_IP_MAX_CONNECTIONS="1"))
    clients(srv.url, additional_headers={"X-Forwarded-For": "198.51.100.1"})
    with pytest.raises(InvalidStatus) as info:
        clients(srv.url, additional_headers={"X-Forwarded-For": "198.51.100.2"})
    assert info.value.response.status_code == 429
    assert "198.51.100" not in srv.log()


def test_origin_allow_list(make_server, clients):
    srv = make_server({"VOLLI_ALLOWED_ORIGINS": "https://app.example, https://other.example/"})
    assert clients(srv.url, origin="https://app.example").request({"type": "ping"}) \
        == {"type": "pong"}
    clients(srv.url, origin="https://OTHER.example")
    clients(srv.url)  # no Origin: not a browser, nothing to hijack
    with pytest.raises(InvalidStatus) as info:
        clients(srv.url, origin="https://evil.example")
    assert info.value.response.status_code == 403
    assert "refused origin 'https://evil.example'" in srv.log()


def test_empty_origin_list_allows_all_and_says_so(server, clients):
    assert clients(origin="https://anything.example").request({"type": "ping"}) \
        == {"type": "pong"}
    assert "VOLLI_ALLOWED_ORIGINS is empty" in server.log()
