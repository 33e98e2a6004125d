"""Sealed signaling in the browser client (docs/protocol.md section 5e), pure crypto:
headless Chromium loads the real volli-signaling.js from a real gunicorn server and runs
its HPKE and sealing code on WebCrypto.

- RFC 9180 A.1.1 (base mode, X25519/HKDF-SHA256/AES-128-GCM): seal with the vector's
  ephemeral key gives its enc and ct; its ct opens with skRm.
- The worked example of section 5e (tests/vectors/sealed-example.json), byte for byte.
- Cross-implementation: the JS client seals, volli.protocol.sealing opens, and back.
- Tampering, as the JS opener sees it: `to`, `type`, `from`, `enc`, `ct` each alone ->
  does-not-open; another sender key -> bad-signature; old or future ts -> stale; the same
  message twice (also with `enc` spelled in non-canonical base64) -> replayed.
"""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nacl.signing import SigningKey

from conftest import ROOT, Server
from test_browser import CHROMIUM_ARGS, WAIT_MS, browser  # noqa: F401 (fixture)
from volli.protocol import sealing

pytestmark = pytest.mark.timeout(120)

VECTOR = json.loads((ROOT / "tests" / "vectors" / "sealed-example.json").read_text())

RFC = {  # RFC 9180 A.1.1
    "info": "4f6465206f6e2061204772656369616e2055726e",
    "skEm": "52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736",
    "pkEm": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    "skRm": "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8",
    "pkRm": "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
    "aad": "436f756e742d30",
    "pt": "4265617574792069732074727574682c20747275746820626561757479",
    "ct": "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e1"
          "3c512a",
}

# Helpers every script below gets as window.T (the client module is window.T.m).
HELPERS = """
async () => {
  const m = await import("/volli-signaling.js");
  const hex = (h) => Uint8Array.from(h.match(/../g) ?? [], (x) => parseInt(x, 16));
  const toHex = (b) => Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, "0")).join("");
  const ed25519 = async (seedHex) => {
    const pkcs8 = new Uint8Array([0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b,
                                  0x65, 0x70, 0x04, 0x22, 0x04, 0x20, ...hex(seedHex)]);
    return crypto.subtle.importKey("pkcs8", pkcs8, {name: "Ed25519"}, false, ["sign"]);
  };
  const reason = async (promise) => {
    try { await promise; return "opened"; } catch (err) { return err.reason ?? `other: ${err}`; }
  };
  window.T = {m, hex, toHex, ed25519, reason};
  return Object.keys(m).sort();
}
"""


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("sealed-js")).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(browser, web_server):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(f"http://127.0.0.1:{web_server.port}/health")
    exports = page.evaluate(HELPERS)
    assert {"hpkeSeal", "hpkeOpen", "sealPayload", "openSealed", "ReplayGuard",
            "importEncryptionKeyPair", "signEncryptionKey"} <= set(exports), exports
    yield page
    context.close()


def test_rfc9180_a11_seal_and_open(page):
    r = page.evaluate("""async (v) => {
      const {m, hex, toHex} = window.T;
      const ephemeral = await m.importEncryptionKeyPair(hex(v.skEm));
      const receiver = await m.importEncryptionKeyPair(hex(v.skRm));
      const pkRm = toHex(await crypto.subtle.exportKey("raw", receiver.publicKey));
      const {enc, ct} = await m.hpkeSeal(hex(v.pkRm), hex(v.info), hex(v.aad), hex(v.pt), {ephemeral});
      const opened = await m.hpkeOpen(receiver, hex(v.pkEm), hex(v.info), hex(v.aad), hex(v.ct));
      const wrongAad = await window.T.reason(
        m.hpkeOpen(receiver, hex(v.pkEm), hex(v.info), hex("436f756e742d31"), hex(v.ct)));
      return {pkRm, enc: toHex(enc), ct: toHex(ct), opened: toHex(opened), wrongAad};
    }""", RFC)
    assert r == {"pkRm": RFC["pkRm"], "enc": RFC["pkEm"], "ct": RFC["ct"], "opened": RFC["pt"],
                 "wrongAad": "does-not-open"}


def test_worked_example_byte_for_byte(page):
    r = page.evaluate("""async (v) => {
      const {m, hex, toHex, ed25519} = window.T;
      const alice = await ed25519(v.senderIdentitySeed);
      const bob = await ed25519(v.receiverIdentitySeed);
      const bobEncryption = await m.importEncryptionKeyPair(hex(v.receiverEncryptionPrivateKey));
      const ephemeral = await m.importEncryptionKeyPair(hex(v.ephemeralPrivateKey));
      const encryptionKey = btoa(String.fromCharCode(
        ...new Uint8Array(await crypto.subtle.exportKey("raw", bobEncryption.publicKey))));
      // From the payload: body, signature and plaintext made by the client itself.
      const sealed = await m.sealPayload(v.type, v.from, v.to, v.payload, v.encryptionKey, alice,
                                         {ts: v.ts, ephemeral});
      // From the vector's exact plaintext.
      const fromPlaintext = await m.sealPayload(v.type, v.from, v.to, null, v.encryptionKey, alice,
                                                {ephemeral, plaintext: v.plaintext});
      const opened = await m.openSealed(v.type, v.from, v.to, v.sealed, bobEncryption,
                                        v.senderPublicKey, {now: v.ts + 1000});
      return {encryptionKey, sealed, fromPlaintext, opened,
              ctHex: toHex(Uint8Array.from(atob(sealed.ct), (c) => c.charCodeAt(0))),
              keySignature: await m.signEncryptionKey(bob, "bob", v.encryptionKey)};
    }""", VECTOR)
    assert r["encryptionKey"] == VECTOR["encryptionKey"]
    assert r["sealed"] == VECTOR["sealed"]
    assert r["fromPlaintext"] == VECTOR["sealed"]
    assert r["ctHex"] == VECTOR["ctHex"]
    assert r["keySignature"] == VECTOR["encryptionKeySignature"]
    assert r["opened"] == {"payload": VECTOR["payload"], "ts": VECTOR["ts"]}


# Payloads that stress the JSON text of `body` in both directions.
PAYLOADS = [
    {"type": "offer", "sdp": "v=0\r\no=- 4611 2 IN IP4 127.0.0.1\r\na=fingerprint:sha-256 AB:CD\r\n"},
    {"candidate": "candidate:1 1 udp 2122260223 192.168.1.7 54321 typ host",
     "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": None},
    None,  # end of candidates
    {"note": "é ✓ 🎉 \u2028 \t \"quoted\" \\ \u0001 \u007f", "n": [1, -2.5, True, {}]},
]


def keys():
    return X25519PrivateKey.generate(), SigningKey.generate()


def raw_x25519(private: X25519PrivateKey) -> bytes:
    from volli.protocol import hpke
    return hpke.public_bytes(private)


@pytest.mark.parametrize("payload", PAYLOADS, ids=["offer", "candidate", "null", "unicode"])
def test_js_seals_python_opens(page, payload):
    receiver, alice = keys()
    sealed = page.evaluate("""async ({encryptionKey, seed, payload}) => {
      const {m, ed25519} = window.T;
      return m.sealPayload("ice-candidate", "alice@x", "bob@x", payload, encryptionKey,
                           await ed25519(seed));
    }""", {"encryptionKey": base64.b64encode(raw_x25519(receiver)).decode(),
           "seed": bytes(alice).hex(), "payload": payload})
    now = int(time.time() * 1000)
    opened, ts = sealing.open_("ice-candidate", "alice@x", "bob@x", sealed, receiver,
                               bytes(alice.verify_key), now)
    assert opened == payload
    assert abs(ts - now) < 10_000


@pytest.mark.parametrize("payload", PAYLOADS, ids=["offer", "candidate", "null", "unicode"])
def test_python_seals_js_opens(page, payload):
    receiver, alice = keys()
    ts = int(time.time() * 1000)
    sealed = sealing.seal("answer", "alice@x", "bob@x", payload, raw_x25519(receiver), alice, ts)
    r = page.evaluate("""async ({sk, sealed, senderKey}) => {
      const {m, hex} = window.T;
      const receiver = await m.importEncryptionKeyPair(hex(sk));
      return m.openSealed("answer", "alice@x", "bob@x", sealed, receiver, senderKey);
    }""", {"sk": receiver.private_bytes_raw().hex(), "sealed": sealed,
           "senderKey": base64.b64encode(bytes(alice.verify_key)).decode()})
    assert r == {"payload": payload, "ts": ts}


def flip(b64: str, index: int) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def non_canonical(b64: str) -> str:
    """The same 32 bytes in base64 with the unused low bits of the last character set."""
    assert b64.endswith("=") and len(b64) == 44
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(b64[42])
    other = b64[:42] + alphabet[last | 0b11 if last & 0b11 == 0 else last & ~0b11] + "="
    assert other != b64 and base64.b64decode(other) == base64.b64decode(b64)
    return other


# (case, changes to the received message or the opener) -> reason
TAMPERING = {
    "to": ({"to": "carol@x"}, "does-not-open"),
    "type": ({"type": "answer"}, "does-not-open"),
    "from": ({"from": "mallory@x"}, "does-not-open"),
    "enc": ({"enc": "flip"}, "does-not-open"),
    "ct": ({"ct": "flip"}, "does-not-open"),
    "ct-truncated": ({"ct": "truncate"}, "does-not-open"),
    "enc-short": ({"enc": "short"}, "malformed"),
    "sender-key": ({"senderKey": "other"}, "bad-signature"),
    "no-sender-key": ({"senderKey": None}, "unknown-sender"),
    "stale": ({"now": 301_000}, "stale"),
    "future": ({"now": -61_000}, "stale"),
    "untouched": ({}, "opened"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_detected_by_the_js_opener(page, case):
    change, expected = TAMPERING[case]
    receiver, alice = keys()
    ts = int(time.time() * 1000)
    sealed = sealing.seal("offer", "alice@x", "bob@x", PAYLOADS[0], raw_x25519(receiver),
                          alice, ts)
    if change.get("enc") == "flip":
        sealed["enc"] = flip(sealed["enc"], 5)
    if change.get("enc") == "short":
        sealed["enc"] = base64.b64encode(base64.b64decode(sealed["enc"])[:31]).decode()
    if change.get("ct") == "flip":
        sealed["ct"] = flip(sealed["ct"], 40)
    if change.get("ct") == "truncate":
        sealed["ct"] = base64.b64encode(base64.b64decode(sealed["ct"])[:-1]).decode()
    sender_key = base64.b64encode(bytes(alice.verify_key)).decode()
    if change.get("senderKey") == "other":
        sender_key = base64.b64encode(bytes(SigningKey.generate().verify_key)).decode()
    elif "senderKey" in change:
        sender_key = None
    r = page.evaluate("""async (a) => {
      const {m, hex, reason} = window.T;
      const receiver = await m.importEncryptionKeyPair(hex(a.sk));
      return reason(m.openSealed(a.type, a.from, a.to, a.sealed, receiver, a.senderKey,
                                 {now: a.now}));
    }""", {"sk": receiver.private_bytes_raw().hex(), "sealed": sealed,
           "type": change.get("type", "offer"), "from": change.get("from", "alice@x"),
           "to": change.get("to", "bob@x"), "senderKey": sender_key,
           "now": ts + change.get("now", 0)})
    assert r == expected


def test_the_same_message_twice_is_a_replay(page):
    receiver, alice = keys()
    ts = int(time.time() * 1000)
    sealed = sealing.seal("offer", "alice@x", "bob@x", PAYLOADS[0], raw_x25519(receiver),
                          alice, ts)
    respelled = {**sealed, "enc": non_canonical(sealed["enc"])}
    other = sealing.seal("offer", "alice@x", "bob@x", PAYLOADS[0], raw_x25519(receiver),
                         alice, ts)
    r = page.evaluate("""async (a) => {
      const {m, hex, reason} = window.T;
      const receiver = await m.importEncryptionKeyPair(hex(a.sk));
      const guard = new m.ReplayGuard();
      const open = (sealed) => reason(m.openSealed("offer", "alice@x", "bob@x", sealed,
                                                   receiver, a.senderKey, {replayGuard: guard}));
      return [await open(a.sealed), await open(a.sealed), await open(a.respelled),
              await open(a.other)];
    }""", {"sk": receiver.private_bytes_raw().hex(), "sealed": sealed, "respelled": respelled,
           "other": other, "senderKey": base64.b64encode(bytes(alice.verify_key)).decode()})
    assert r == ["opened", "replayed", "replayed", "opened"]


def test_the_replay_guard_forgets_past_its_window_and_capacity(page):
    r = page.evaluate("""() => {
      const {m, reason} = window.T;
      const outcome = (f) => { try { f(); return "ok"; } catch (err) { return err.reason; } };
      const guard = new m.ReplayGuard(1000, 3);
      const seen = [outcome(() => guard.check("a", 0)), outcome(() => guard.check("a", 999)),
                    outcome(() => guard.check("a", 1001)) /* forgotten: older than the window */];
      for (const enc of ["b", "c", "d"]) guard.check(enc, 1002);
      seen.push(outcome(() => guard.check("a", 1003))); // pushed out by capacity
      seen.push(outcome(() => guard.check("d", 1003)));
      return seen;
    }""")
    assert r == ["ok", "replayed", "ok", "ok", "replayed"]
