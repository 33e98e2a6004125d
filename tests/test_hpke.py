"""volli.protocol.hpke against RFC 9180 appendix A.1.1 (base mode, DHKEM(X25519,
HKDF-SHA256), HKDF-SHA256, AES-128-GCM) and against cryptography's own HPKE."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from volli.protocol import hpke

H = bytes.fromhex
# RFC 9180 A.1.1, sequence number 0.
VECTOR = {
    "info": H("4f6465206f6e2061204772656369616e2055726e"),
    "ikmE": H("7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234"),
    "skEm": H("52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736"),
    "pkEm": H("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431"),
    "ikmR": H("6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037"),
    "skRm": H("4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8"),
    "pkRm": H("3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d"),
    "aad": H("436f756e742d30"),
    "pt": H("4265617574792069732074727574682c20747275746820626561757479"),
    "ct": H("f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"),
}
SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_128_GCM)


def test_derive_key_pair_matches_the_rfc():
    assert hpke.derive_key_pair(VECTOR["ikmE"]).private_bytes_raw() == VECTOR["skEm"]
    receiver = hpke.derive_key_pair(VECTOR["ikmR"])
    assert receiver.private_bytes_raw() == VECTOR["skRm"]
    assert hpke.public_bytes(receiver) == VECTOR["pkRm"]


def test_seal_and_open_match_the_rfc():
    ephemeral = hpke.derive_key_pair(VECTOR["ikmE"])
    enc, ct = hpke.seal(VECTOR["pkRm"], VECTOR["info"], VECTOR["aad"], VECTOR["pt"], ephemeral)
    assert (enc, ct) == (VECTOR["pkEm"], VECTOR["ct"])
    receiver = hpke.derive_key_pair(VECTOR["ikmR"])
    assert hpke.open_(receiver, enc, VECTOR["info"], VECTOR["aad"], ct) == VECTOR["pt"]


@pytest.mark.parametrize("field", ["enc", "ct", "info", "aad"])
def test_any_change_fails_to_open(field):
    receiver = hpke.derive_key_pair(VECTOR["ikmR"])
    args = {"enc": VECTOR["pkEm"], "info": VECTOR["info"], "aad": VECTOR["aad"],
            "ct": VECTOR["ct"]}
    value = bytearray(args[field])
    value[0] ^= 1
    args[field] = bytes(value)
    with pytest.raises(hpke.OpenError):
        hpke.open_(receiver, args["enc"], args["info"], args["aad"], args["ct"])


def test_a_small_order_enc_is_refused():
    receiver = hpke.derive_key_pair(VECTOR["ikmR"])
    with pytest.raises(hpke.OpenError):
        hpke.open_(receiver, bytes(32), VECTOR["info"], b"", VECTOR["ct"])


def test_interoperates_with_cryptographys_hpke_both_ways():
    """cryptography's single-shot API has an empty AAD; with one, both open each other."""
    receiver = hpke.derive_key_pair(VECTOR["ikmR"])
    theirs = SUITE.encrypt(b"from cryptography", receiver.public_key(), info=b"volli")
    assert hpke.open_(receiver, theirs[:32], b"volli", b"", theirs[32:]) == b"from cryptography"
    enc, ct = hpke.seal(VECTOR["pkRm"], b"volli", b"", b"from volli")
    assert SUITE.decrypt(enc + ct, receiver, info=b"volli") == b"from volli"
