"""The hub's rules over the in-memory backend, with recording sessions instead of sockets."""

import json

import pytest

from volli.backends import BackendUnavailable, MemoryBackend
from volli.config import Settings
from volli.hub import Hub
from volli.protocol import Ping


class RecordingSession:
    _ids = 0

    def __init__(self, accept: bool = True):
        RecordingSession._ids += 1
        self.id = f"s{RecordingSession._ids}"
        self.user_id = None
        self.public_key = None
        self.signed = False
        self.encryption_key = None
        self.nonce = ""
        self.remote_addr = "192.0.2.1"
        self.sent: list[dict] = []
        self.origins: list[str | None] = []
        self.closed_with = None
        self.accept = accept

    def send(self, text, origin=None):
        if not self.accept:
            return False
        self.sent.append(json.loads(text))
        self.origins.append(origin)
        return True

    def close(self, code, reason=""):
        self.closed_with = code

    @property
    def closed(self):
        return self.closed_with is not None

    def last(self):
        return self.sent[-1]


SETTINGS = Settings()


@pytest.fixture
def hub():
    return Hub(SETTINGS, lambda events: MemoryBackend(events=events))


def join(hub, user_id, **kwargs):
    session = RecordingSession(**kwargs)
    hub.connect(session)
    hub.receive_text(session, json.dumps({"type": "register", "userId": user_id,
                                          "publicKey": "AAAA"}))
    return session


def test_register_discover_relay(hub):
    alice, bob = join(hub, "alice"), join(hub, "bob")
    assert alice.last() == {"type": "registered", "userId": "alice"}
    hub.receive_text(alice, '{"type":"discover","userId":"bob"}')
    assert alice.last() == {"type": "discover-response", "userId": "bob", "online": True,
                            "publicKey": "AAAA", "verified": False}
    hub.receive_text(alice, '{"type":"offer","to":"bob","offer":{"sdp":"x"}}')
    assert bob.last() == {"type": "offer", "to": "bob", "offer": {"sdp": "x"}, "from": "alice"}
    assert hub.metrics["relayed"] == 1


def test_rules(hub):
    alice, bob = join(hub, "alice"), join(hub, "bob")
    assert join(hub, "alice").last()["code"] == "user-id-taken"
    hub.receive_text(alice, '{"type":"register","userId":"x","publicKey":"AAAA"}')
    assert alice.last()["code"] == "already-registered"
    hub.receive_text(alice, '{"type":"offer","from":"bob","to":"bob","offer":{}}')
    assert alice.last()["code"] == "forbidden-sender"
    assert bob.sent[1:] == [{"type": "registered", "userId": "bob"}]
    hub.receive_text(alice, '{"type":"answer","to":"carol","answer":{},"requestId":"q"}')
    assert alice.last() == {"type": "error", "code": "peer-offline",
                            "message": "'carol' is not online", "requestId": "q"}
    stranger = RecordingSession()
    hub.connect(stranger)
    hub.receive_text(stranger, '{"type":"discover","userId":"bob"}')
    assert stranger.last()["code"] == "not-registered"


def test_receiver_that_refuses_the_frame_is_peer_offline(hub):
    alice, _ = join(hub, "alice"), join(hub, "full", accept=False)
    hub.receive_text(alice, '{"type":"ice-candidate","to":"full","candidate":null}')
    assert alice.last()["code"] == "peer-offline"


def test_late_close_of_an_old_session_keeps_the_new_registration(hub):
    old = join(hub, "alice")
    hub.disconnect(old)
    new = join(hub, "alice")
    assert new.last()["type"] == "registered"
    hub.disconnect(old)  # a late, duplicate close of the old socket
    assert hub.backend.lookup("alice").online
    hub.disconnect(new)
    assert not hub.backend.lookup("alice").online


def test_internal_error_is_answered_not_raised(hub):
    alice = join(hub, "alice")

    def broken(session, message, received_at):
        raise RuntimeError("boom")

    hub._handlers[Ping] = broken
    hub.receive_text(alice, '{"type":"ping","requestId":3}')
    assert alice.last() == {"type": "error", "code": "internal-error",
                            "message": "internal server error", "requestId": 3}


def test_shutdown_closes_every_session_with_1001(hub):
    sessions = [join(hub, f"u{i}") for i in range(3)]
    assert hub.shutdown() == 3
    assert [s.closed_with for s in sessions] == [1001] * 3


def test_relays_carry_their_origin_and_dropped_ones_are_reported_to_senders(hub):
    alice, bob, carol = join(hub, "alice"), join(hub, "bob"), join(hub, "carol")
    hub.receive_text(alice, '{"type":"offer","to":"carol","offer":{}}')
    assert carol.origins[-1] == "alice" and alice.origins[-1] is None
    hub.report_undelivered("carol", {"alice": 3, "bob": 1})
    assert alice.last() == {"type": "error", "code": "peer-offline", "peer": "carol",
                            "undelivered": 3,
                            "message": "3 message(s) to 'carol' were not delivered: it disconnected"}
    assert bob.last()["undelivered"] == 1
    assert hub.metrics["undelivered"] == 4


def test_unsigned_users_leave_nothing_behind(hub):
    alice, bob = join(hub, "alice"), join(hub, "bob")
    hub.disconnect(bob)
    hub.receive_text(alice, '{"type":"discover","userId":"bob"}')
    assert alice.last() == {"type": "discover-response", "userId": "bob", "online": False,
                            "publicKey": None, "verified": False}
    assert hub.backend.binding_count() == 0


class UnreachableStore(MemoryBackend):
    def claim(self, session, user_id, public_key, signed, encryption_key=None):
        raise BackendUnavailable("connection refused")


def test_unreachable_shared_store_is_answered_unavailable():
    hub = Hub(SETTINGS, lambda events: UnreachableStore(events=events))
    session = RecordingSession()
    hub.connect(session)
    hub.receive_text(session, '{"type":"register","userId":"a","publicKey":"AAAA","requestId":1}')
    assert session.last() == {"type": "error", "code": "unavailable", "requestId": 1,
                              "message": "presence store unreachable; retry shortly"}
    assert session.user_id is None


def test_each_hub_builds_its_own_backend_that_reports_to_it():
    """The backend gets its events (the hub) at construction: a second hub cannot take
    over the first one's hooks (they were once set from outside)."""
    made = []

    def make(events):
        made.append(events)
        return MemoryBackend(events=events)

    first, second = Hub(SETTINGS, make), Hub(SETTINGS, make)
    assert made == [first, second] and first.backend is not second.backend
    # An operator unbind in the first backend closes its holder through the first hub.
    alice = join(first, "alice")
    assert first.backend.unbind("alice") is True
    assert alice.last() == {"type": "session-replaced"} and alice.closed_with == 4000
