"""Real WebRTC through Volli: two aiortc peers, each with a volli.client.VolliClient, signal
through a real gunicorn server (memory backend) and open a data channel between them.

Loopback ICE: aioice leaves 127.0.0.1 out of its host addresses, so on a machine with only
`lo` aiortc gathers no candidate and never connects. The `loopback_ice` fixture makes
aioice's address discovery (`aioice.ice.get_host_addresses`) return 127.0.0.1, so both
peers gather one real UDP host candidate on loopback; everything else (STUN checks, DTLS,
SCTP) is the real stack. `iceServers=[]` keeps aiortc away from its default public STUN.
"""

from __future__ import annotations

import asyncio

import aioice.ice
import pytest
from aiortc import (RTCConfiguration, RTCDataChannel, RTCIceCandidate, RTCPeerConnection,
                    RTCSessionDescription)
from nacl.signing import SigningKey

from conftest import Server
from volli.protocol import sealing
from volli.client import (VolliClient, VolliError, candidate_from_dict, candidate_to_dict,
                          description_from_dict, description_to_dict)

OPTIONS = {"open_timeout": 5, "proxy": None}
CONNECT_TIMEOUT = 20.0  # ICE + DTLS + SCTP on loopback take well under a second


@pytest.fixture(scope="module")
def volli_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("aiortc")).wait_ready()  # memory backend
    yield srv
    srv.stop()


@pytest.fixture
def loopback_ice(monkeypatch):
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"])


def run(coro, timeout: float = 40.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def split_candidates(sdp: str) -> tuple[str, list[dict]]:
    """The SDP without its candidate lines, and those candidates in browser toJSON form,
    as a browser that trickles would send them."""
    kept, candidates, index, mid = [], [], -1, None
    for line in sdp.split("\r\n"):
        if line.startswith("m="):
            index, mid = index + 1, None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        if line.startswith("a=candidate:"):
            candidates.append({"candidate": line[2:], "sdpMid": mid, "sdpMLineIndex": index})
        elif line != "a=end-of-candidates":
            kept.append(line)
    return "\r\n".join(kept), candidates


# Conversion helpers (no server).

def test_candidate_round_trip_in_browser_form():
    text = ("candidate:842163049 1 udp 1677729535 198.51.100.7 61000 typ srflx "
            "raddr 10.0.0.5 rport 54400")
    candidate = candidate_from_dict({"candidate": text, "sdpMid": "0", "sdpMLineIndex": 0})
    assert isinstance(candidate, RTCIceCandidate)
    assert (candidate.foundation, candidate.component) == ("842163049", 1)
    assert candidate.protocol == "udp"
    assert (candidate.ip, candidate.port, candidate.type) == ("198.51.100.7", 61000, "srflx")
    assert (candidate.relatedAddress, candidate.relatedPort) == ("10.0.0.5", 54400)
    assert (candidate.sdpMid, candidate.sdpMLineIndex) == ("0", 0)
    assert candidate_to_dict(candidate) == {"candidate": text, "sdpMid": "0", "sdpMLineIndex": 0}
    # "a=candidate:" as in an SDP line is accepted too.
    assert candidate_from_dict({"candidate": "a=" + text, "sdpMid": "0"}).port == 61000


def test_end_of_candidates_forms():
    assert candidate_from_dict(None) is None
    assert candidate_from_dict({"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0}) is None
    assert candidate_to_dict(None) is None


def test_description_round_trip():
    description = RTCSessionDescription(sdp="v=0\r\n", type="offer")
    assert description_to_dict(description) == {"type": "offer", "sdp": "v=0\r\n"}
    assert description_from_dict({"type": "answer", "sdp": "v=0\r\n"}) == \
        RTCSessionDescription(sdp="v=0\r\n", type="answer")
    assert description_to_dict({"type": "offer", "sdp": "x"}) == {"type": "offer", "sdp": "x"}


def test_signature_matches_the_protocol_test_vector():
    key = SigningKey(bytes(range(32)))
    client = VolliClient("ws://unused", "alice@volli.app", key)
    assert client.public_key == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    from volli.protocol.identity import register_payload
    assert client._sign(register_payload("bm9uY2Utb2YtdGhlLXRlc3Qh", "alice@volli.app")) == (
        "5vf8lnJ/TzqcHHJn4bcP4Cbts4y5lkfSfXvF48Fgx+SCqi8nB7ETX+44cc6L5whfWlyuTTPAAtq9ikAHPC8/AA==")
    with pytest.raises(ValueError):
        VolliClient("ws://unused", "alice@volli.app")
    with pytest.raises(ValueError):
        VolliClient("ws://unused", "alice@volli.app", key, public_key="b3RoZXI=")


# The client against the real server.

def test_client_requests_and_errors(volli_server):
    async def scenario():
        key = SigningKey.generate()
        async with VolliClient(volli_server.url, "carol@requests", key, **OPTIONS) as carol:
            assert carol.nonce  # the next nonce, from the signed "registered"
            assert await carol.ping() < 5
            assert await carol.ice_servers() == []
            assert await carol.discover("nobody@requests") == {
                "userId": "nobody@requests", "online": False, "publicKey": None,
                "verified": False, "encryptionKey": None}
            assert await carol.discover("carol@requests") == {
                "userId": "carol@requests", "online": True, "publicKey": carol.public_key,
                "verified": True, "encryptionKey": sealing.b64(
                    carol.encryption_key.public_key().public_bytes_raw())}
            # Refusals raise VolliError with the server's code: a signed ID is bound to its
            # key, an unsigned one held by a live connection is taken.
            with pytest.raises(VolliError) as info:
                await VolliClient(volli_server.url, "carol@requests", public_key="eA==",
                                  **OPTIONS).connect()
            assert info.value.code == "identity-bound"
            async with VolliClient(volli_server.url, "erin@requests", public_key="eA==",
                                   **OPTIONS) as erin:
                with pytest.raises(VolliError) as info:
                    await VolliClient(volli_server.url, "erin@requests", public_key="eQ==",
                                      **OPTIONS).connect()
                assert info.value.code == "user-id-taken"
                assert (await carol.discover("erin@requests"))["publicKey"] == erin.public_key
            # A relay to an offline user: no reply, the error arrives as a message.
            await carol.send_offer("nobody@requests", {"type": "offer", "sdp": "v=0\r\n"})
            error = await carol.recv(timeout=5)
            assert (error["type"], error["code"]) == ("error", "peer-offline")
            # Key rotation binds the new key.
            new_key = SigningKey.generate()
            await carol.rotate_key(new_key)
            assert (await carol.discover("carol@requests"))["publicKey"] == carol.public_key
        with pytest.raises(ConnectionError):
            await carol.recv(timeout=5)
        # The ID is now bound to the rotated key: unsigned and old-key registrations fail.
        with pytest.raises(VolliError) as info:
            await VolliClient(volli_server.url, "carol@requests", public_key="eA==",
                              **OPTIONS).connect()
        assert info.value.code == "identity-bound"
        with pytest.raises(VolliError) as info:
            await VolliClient(volli_server.url, "carol@requests", key, **OPTIONS).connect()
        assert info.value.code == "bad-signature"
        async with VolliClient(volli_server.url, "carol@requests", new_key, **OPTIONS):
            pass

    run(scenario())


def test_session_replaced_reaches_the_old_client(volli_server):
    async def scenario():
        key = SigningKey.generate()
        old = VolliClient(volli_server.url, "dave@replaced", key, **OPTIONS)
        await old.connect()
        async with VolliClient(volli_server.url, "dave@replaced", key, **OPTIONS):
            assert (await old.recv(timeout=5))["type"] == "session-replaced"
            with pytest.raises(ConnectionError):
                await old.recv(timeout=5)
            assert old.close_code == 4000
        await old.close()

    run(scenario())


# aiortc <-> aiortc.

def test_aiortc_data_channel_through_volli(volli_server, loopback_ice):
    async def scenario():
        caller_id, callee_id = "alice@aiortc", "bob@aiortc"
        config = RTCConfiguration(iceServers=[])
        pc_a, pc_b = RTCPeerConnection(config), RTCPeerConnection(config)
        alice = VolliClient(volli_server.url, caller_id, SigningKey.generate(), **OPTIONS)
        bob = VolliClient(volli_server.url, callee_id, public_key="Ym9iLXB1YmxpYy1rZXk=",
                          **OPTIONS)
        seen: dict[str, list] = {"bob-candidates": [], "alice-candidates": []}
        to_bob: asyncio.Queue = asyncio.Queue()
        to_alice: asyncio.Queue = asyncio.Queue()
        bob_channel: asyncio.Future[RTCDataChannel] = asyncio.get_running_loop().create_future()
        try:
            await alice.connect()
            await bob.connect()
            assert await alice.discover(callee_id) == {
                "userId": callee_id, "online": True, "publicKey": "Ym9iLXB1YmxpYy1rZXk=",
                "verified": False, "encryptionKey": None}
            assert (await bob.discover(caller_id))["publicKey"] == alice.public_key

            # Callee: answer offers (candidates inside the SDP, as aiortc does), take
            # trickled candidates and the end-of-candidates null.
            async def on_offer(message: dict) -> None:
                assert message["from"] == caller_id
                await pc_b.setRemoteDescription(description_from_dict(message["offer"]))
                await pc_b.setLocalDescription(await pc_b.createAnswer())
                await bob.send_answer(message["from"], pc_b.localDescription)
                await bob.send_candidate(message["from"], None)

            async def on_bob_candidate(message: dict) -> None:
                assert message["from"] == caller_id
                seen["bob-candidates"].append(message["candidate"])
                await pc_b.addIceCandidate(candidate_from_dict(message["candidate"]))

            bob.on("offer", on_offer)
            bob.on("ice-candidate", on_bob_candidate)

            @pc_b.on("datachannel")
            def on_datachannel(channel: RTCDataChannel) -> None:
                channel.on("message", to_bob.put_nowait)
                bob_channel.set_result(channel)

            # Caller: a data channel, then the offer. Its candidates go out trickled (as a
            # browser sends them), so the callee must use what came through Volli.
            channel = pc_a.createDataChannel("chat")
            opened = asyncio.Event()
            channel.on("open", opened.set)
            channel.on("message", to_alice.put_nowait)
            await pc_a.setLocalDescription(await pc_a.createOffer())
            sdp, candidates = split_candidates(pc_a.localDescription.sdp)
            assert candidates and all(" 127.0.0.1 " in c["candidate"] for c in candidates)
            await alice.send_offer(callee_id, RTCSessionDescription(sdp=sdp, type="offer"))
            for candidate in candidates:
                # Through the aiortc object and back, as an aiortc app would send it.
                as_aiortc = candidate_from_dict(candidate)
                await alice.send_candidate(callee_id, as_aiortc)
            await alice.send_candidate(callee_id, None)

            answer = await alice.recv(timeout=10)
            assert (answer["type"], answer["from"]) == ("answer", callee_id)
            assert "a=candidate:" in answer["answer"]["sdp"]
            await pc_a.setRemoteDescription(description_from_dict(answer["answer"]))
            end = await alice.recv(timeout=10)
            assert (end["type"], end["from"]) == ("ice-candidate", callee_id)
            assert end["candidate"] is None
            await pc_a.addIceCandidate(candidate_from_dict(end["candidate"]))

            await asyncio.wait_for(opened.wait(), CONNECT_TIMEOUT)
            assert seen["bob-candidates"] == [*candidates, None]
            channel.send("hello from alice")
            channel.send(b"\x00\x01binary")
            assert await asyncio.wait_for(to_bob.get(), 10) == "hello from alice"
            assert await asyncio.wait_for(to_bob.get(), 10) == b"\x00\x01binary"
            remote = await asyncio.wait_for(bob_channel, 10)
            assert remote.label == "chat"
            remote.send("hello from bob")
            assert await asyncio.wait_for(to_alice.get(), 10) == "hello from bob"
            assert pc_a.connectionState == pc_b.connectionState == "connected"
            pair = pc_a.sctp.transport.transport._connection._nominated[1]
            assert pair.local_candidate.host == pair.remote_candidate.host == "127.0.0.1"
        finally:
            await asyncio.gather(pc_a.close(), pc_b.close(), return_exceptions=True)
            await asyncio.gather(alice.close(), bob.close(), return_exceptions=True)

    run(scenario())
