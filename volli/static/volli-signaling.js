/**
 * volli-signaling.js: the browser client for the Volli WebRTC signaling server.
 *
 * A dependency-free ES module (no build step). It speaks the protocol of
 * docs/protocol.md over one WebSocket: registers (optionally signed with an Ed25519
 * CryptoKeyPair), discovers users, relays offers, answers and ICE candidates, keeps the
 * connection alive with application pings, and reconnects with exponential backoff.
 * Guide and examples: docs/client-js.md.
 *
 * @example
 * import { VolliSignaling } from "/volli-signaling.js";
 * const sig = new VolliSignaling(null, { userId: "alice@volli.app" });
 * sig.on("offer", (msg) => console.log("offer from", msg.from, msg.offer));
 * await sig.connect();
 *
 * @module volli-signaling
 */

/** Protocol version this client speaks (the `version` of the server's `hello`). */
export const PROTOCOL_VERSION = 1;

/** Close codes after which the client never reconnects: 4000 session replaced, 4029 abuse. */
export const NO_RECONNECT_CODES = Object.freeze([4000, 4029]);

/** `register` error codes that a reconnect retries; any other one stops the client. */
const RETRYABLE_REGISTER_ERRORS = new Set(["user-id-taken", "unavailable", "rate-limited",
  "internal-error"]);

/**
 * The direct reply each request type expects (docs/protocol.md section 2); `error` fits
 * every request. Only these settle a pending request: a relayed offer, answer or
 * ice-candidate carries whatever `requestId` its sender chose.
 */
const REPLY_FOR = Object.freeze({ register: "registered", discover: "discover-response",
  ping: "pong", "rotate-key": "key-rotated", "ice-servers": "ice-servers",
  watch: "watching", unwatch: "unwatched", "push-subscribe": "push-subscribed",
  "push-unsubscribe": "push-unsubscribed" });
const REPLY_TYPES = new Set([...Object.values(REPLY_FOR), "error"]);

const REGISTER_CONTEXT = "volli/register/v1";
const ROTATE_CONTEXT = "volli/rotate-key/v1";
const ED25519 = { name: "Ed25519" };

/**
 * An error from the server (`{type:"error", code, message}`) or from this client.
 * Client-side codes: `not-connected`, `disconnected`, `timeout`, `closed`, `connect-failed`,
 * `unsupported`, `message-too-large` (larger than the server's `maxMessageSize`: not sent).
 */
export class VolliError extends Error {
  /**
   * @param {string} code machine-readable code; branch on this
   * @param {string} message human-readable text
   * @param {object} [reply] the server's error message, when it came from the server
   */
  constructor(code, message, reply) {
    super(message);
    this.name = "VolliError";
    this.code = code;
    this.reply = reply;
  }
}

/** `ws(s)://<this page's host>/signaling`, the endpoint of the server that served the page. */
export function defaultUrl() {
  const scheme = globalThis.location?.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${globalThis.location.host}/signaling`;
}

function subtle() {
  // WebCrypto only exists in secure contexts: https://, or http://localhost / 127.0.0.1.
  if (!globalThis.crypto?.subtle) {
    throw new VolliError("unsupported",
      "WebCrypto is unavailable: signing needs a secure context (https or localhost)");
  }
  return globalThis.crypto.subtle;
}

/** `http(s)://host` of a `ws(s)://host/path` signaling URL. */
function httpBase(url) {
  const u = new URL(url, globalThis.location?.href);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  return `${u.protocol}//${u.host}`;
}

function fromBase64url(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - text.length % 4) % 4);
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

const utf8 = (text) => new TextEncoder().encode(text);

function base64(bytes) {
  let text = "";
  for (const b of new Uint8Array(bytes)) text += String.fromCharCode(b);
  return btoa(text);
}

/**
 * A new Ed25519 key pair for signed registration.
 * The private key is not extractable unless asked; a CryptoKeyPair can be stored in
 * IndexedDB as is, so an identity can outlive the page without ever exporting it.
 * @param {{extractable?: boolean}} [options]
 * @returns {Promise<CryptoKeyPair>}
 */
export async function generateKeyPair({ extractable = false } = {}) {
  try {
    return await subtle().generateKey(ED25519, extractable, ["sign", "verify"]);
  } catch (err) {
    if (err instanceof VolliError) throw err;
    throw new VolliError("unsupported", `this browser cannot generate Ed25519 keys: ${err}`);
  }
}

/**
 * The raw 32-byte public key in standard base64: the `publicKey` of a signed `register`.
 * @param {CryptoKey} publicKey
 * @returns {Promise<string>}
 */
export async function exportPublicKey(publicKey) {
  return base64(await subtle().exportKey("raw", publicKey));
}

/**
 * The base64 Ed25519 signature over the UTF-8 bytes
 * `volli/register/v1\n<nonce>\n<userId>` (docs/protocol.md, section 3a).
 * @param {CryptoKey} privateKey
 * @param {string} nonce the `hello` nonce, or the `nonce` of the last signed reply
 * @param {string} userId
 * @returns {Promise<string>}
 */
export async function signRegistration(privateKey, nonce, userId) {
  return sign(privateKey, `${REGISTER_CONTEXT}\n${nonce}\n${userId}`);
}

async function sign(privateKey, text) {
  return base64(await subtle().sign(ED25519, privateKey, utf8(text)));
}

function toJSON(value) {
  return value && typeof value.toJSON === "function" ? value.toJSON() : value;
}

// ---- sealed signaling (docs/protocol.md section 5e) ------------------------------------
// HPKE (RFC 9180) base mode, single shot, one suite: DHKEM(X25519, HKDF-SHA256),
// HKDF-SHA256, AES-128-GCM, on WebCrypto alone (X25519, HMAC-SHA256, AES-GCM). Then the
// sealed envelope: `{body, ts, sig}` signed by the sender's Ed25519 identity key and
// encrypted to the receiver's published X25519 key. Mirrors volli/protocol/hpke.py and
// volli/protocol/sealing.py byte for byte (tests/test_sealed_js.py).

const X25519 = { name: "X25519" };
const ENCRYPTION_KEY_CONTEXT = "volli/encryption-key/v1";
const SEALED_CONTEXT = "volli/sealed-payload/v1";
const SEALED_INFO = "volli/sealed/v1";
/** The payload field of each relay type, replaced by `sealed` when sealed. */
const PAYLOAD_FIELD = Object.freeze({ offer: "offer", answer: "answer",
  "ice-candidate": "candidate" });

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

const HPKE_V1 = utf8("HPKE-v1");
const KEM_SUITE = concat(utf8("KEM"), [0x00, 0x20]);
const HPKE_SUITE = concat(utf8("HPKE"), [0x00, 0x20, 0x00, 0x01, 0x00, 0x01]);

async function hmacSha256(key, data) {
  // An empty salt is a zero key; WebCrypto refuses a zero-length HMAC key, and 32 zero
  // bytes are the same HMAC-SHA256 key (keys are zero-padded to the 64-byte block).
  const k = await subtle().importKey("raw", key.length ? key : new Uint8Array(32),
    { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return new Uint8Array(await subtle().sign("HMAC", k, data));
}

function labeledExtract(suite, salt, label, ikm) {
  return hmacSha256(salt, concat(HPKE_V1, suite, utf8(label), ikm));
}

async function labeledExpand(suite, prk, label, info, length) {
  const labeled = concat([length >> 8, length & 0xff], HPKE_V1, suite, utf8(label), info);
  let out = new Uint8Array(0), block = new Uint8Array(0);
  for (let i = 1; out.length < length; i++) {
    block = await hmacSha256(prk, concat(block, labeled, [i]));
    out = concat(out, block);
  }
  return out.slice(0, length);
}

async function hpkeKey(dh, enc, pkR, info) {
  const eaePrk = await labeledExtract(KEM_SUITE, new Uint8Array(0), "eae_prk", dh);
  const shared = await labeledExpand(KEM_SUITE, eaePrk, "shared_secret", concat(enc, pkR), 32);
  const none = new Uint8Array(0);
  const context = concat([0], await labeledExtract(HPKE_SUITE, none, "psk_id_hash", none),
    await labeledExtract(HPKE_SUITE, none, "info_hash", info));
  const secret = await labeledExtract(HPKE_SUITE, shared, "secret", none);
  const key = await labeledExpand(HPKE_SUITE, secret, "key", context, 16);
  const nonce = await labeledExpand(HPKE_SUITE, secret, "base_nonce", context, 12);
  return { key: await subtle().importKey("raw", key, "AES-GCM", false, ["encrypt", "decrypt"]),
    nonce }; // sequence number 0: the nonce is base_nonce itself
}

async function x25519(privateKey, publicRaw) {
  const pub = await subtle().importKey("raw", publicRaw, X25519, true, []);
  return new Uint8Array(await subtle().deriveBits({ name: "X25519", public: pub }, privateKey, 256));
}

const bytes = (v) => (typeof v === "string" ? utf8(v) : new Uint8Array(v));

/**
 * HPKE SealBase to the raw 32-byte X25519 key `pkR`: `{enc, ct}` (Uint8Arrays).
 * `ephemeral` (a CryptoKeyPair) fixes the ephemeral key: test vectors only.
 */
export async function hpkeSeal(pkR, info, aad, plaintext, { ephemeral } = {}) {
  const eph = ephemeral ?? await subtle().generateKey(X25519, false, ["deriveBits"]);
  const enc = new Uint8Array(await subtle().exportKey("raw", eph.publicKey));
  const dh = await x25519(eph.privateKey, bytes(pkR));
  const { key, nonce } = await hpkeKey(dh, enc, bytes(pkR), bytes(info));
  const ct = await subtle().encrypt({ name: "AES-GCM", iv: nonce, additionalData: bytes(aad) },
    key, bytes(plaintext));
  return { enc, ct: new Uint8Array(ct) };
}

/**
 * HPKE OpenBase with the receiver's X25519 CryptoKeyPair: the plaintext (Uint8Array);
 * throws SealedError `does-not-open` when it does not open (or `enc` is a bad point).
 */
export async function hpkeOpen(keyPair, enc, info, aad, ct) {
  try {
    const pkR = new Uint8Array(await subtle().exportKey("raw", keyPair.publicKey));
    const dh = await x25519(keyPair.privateKey, bytes(enc));
    const { key, nonce } = await hpkeKey(dh, bytes(enc), pkR, bytes(info));
    return new Uint8Array(await subtle().decrypt(
      { name: "AES-GCM", iv: nonce, additionalData: bytes(aad) }, key, bytes(ct)));
  } catch (err) {
    throw new SealedError("does-not-open", `not sealed to this key with this info and aad (${err.name})`);
  }
}

/** A failed sealed message: `reason` (= `code`) is `malformed`, `does-not-open`,
 * `bad-signature`, `stale`, `replayed`, `unknown-sender`, or on sending `no-encryption-key`. */
export class SealedError extends VolliError {
  constructor(reason, message) {
    super(reason, message);
    this.name = "SealedError";
    this.reason = reason;
  }
}

/**
 * A new X25519 key pair for receiving sealed messages (its public key is the
 * `encryptionKey` a signed registration publishes). Storable in IndexedDB as is.
 * @param {{extractable?: boolean}} [options]
 * @returns {Promise<CryptoKeyPair>}
 */
export function generateEncryptionKeyPair({ extractable = false } = {}) {
  return subtle().generateKey(X25519, extractable, ["deriveBits"]);
}

/**
 * The X25519 key pair of a raw 32-byte private key (the public key is taken from the JWK
 * export, so the private key is extractable). For test vectors and keys kept elsewhere.
 * @param {Uint8Array} raw
 * @returns {Promise<CryptoKeyPair>}
 */
export async function importEncryptionKeyPair(raw) {
  const pkcs8 = concat([0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e,
    0x04, 0x22, 0x04, 0x20], bytes(raw));
  const privateKey = await subtle().importKey("pkcs8", pkcs8, X25519, true, ["deriveBits"]);
  const { x } = await subtle().exportKey("jwk", privateKey);
  const publicKey = await subtle().importKey("raw", fromBase64url(x), X25519, true, []);
  return { privateKey, publicKey };
}

/**
 * The base64 Ed25519 signature that publishes an encryption key: over the UTF-8 bytes
 * `volli/encryption-key/v1\n<userId>\n<encryptionKey>`.
 */
export function signEncryptionKey(privateKey, userId, encryptionKey) {
  return sign(privateKey, `${ENCRYPTION_KEY_CONTEXT}\n${userId}\n${encryptionKey}`);
}

const STRICT_BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** Standard base64 with padding, or null. */
function unbase64(text) {
  if (typeof text !== "string" || !STRICT_BASE64.test(text)) return null;
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

async function ed25519Verify(publicKey, signature, text) {
  try {
    const key = publicKey instanceof CryptoKey ? publicKey
      : await subtle().importKey("raw", typeof publicKey === "string" ? unbase64(publicKey) : publicKey,
        ED25519, false, ["verify"]);
    return await subtle().verify(ED25519, key, signature, utf8(text));
  } catch {
    return false; // not a valid key or signature
  }
}

const sealedAad = (type, from, to) => `${type}\n${from}\n${to}`;
const sealedText = (type, from, to, ts, body) =>
  `${SEALED_CONTEXT}\n${type}\n${from}\n${to}\n${ts}\n${body}`;

/**
 * The `sealed` field `{enc, ct}` of a relay of `type` from `from` to `to` carrying
 * `payload`, for the receiver's raw X25519 `encryptionKey` (bytes or base64), signed with
 * the sender's Ed25519 `signingKey`. `ts`: ms since the epoch (default now).
 * `ephemeral` and `plaintext` (the exact text to seal) are for test vectors only.
 */
export async function sealPayload(type, from, to, payload, encryptionKey, signingKey,
  { ts = Date.now(), ephemeral, plaintext } = {}) {
  if (plaintext === undefined) {
    const body = JSON.stringify(payload ?? null);
    const sig = await sign(signingKey, sealedText(type, from, to, ts, body));
    plaintext = JSON.stringify({ body, ts, sig });
  }
  const pkR = typeof encryptionKey === "string" ? unbase64(encryptionKey) : encryptionKey;
  const { enc, ct } = await hpkeSeal(pkR, SEALED_INFO, sealedAad(type, from, to), plaintext,
    { ephemeral });
  return { enc: base64(enc), ct: base64(ct) };
}

/**
 * Whether `payload` has a type the server accepts in clear for a relay of `type`: an
 * object for `offer` and `answer`, an object or null for `ice-candidate`.
 */
function payloadFits(type, payload) {
  if (payload === null) return type === "ice-candidate";
  return typeof payload === "object" && !Array.isArray(payload);
}

/**
 * Steps 1 and 2 of opening (without the signature): `{payload, body, ts, sig, enc}`, `enc`
 * canonical base64 of the encapsulated key. Throws SealedError `malformed` or `does-not-open`.
 */
async function unseal(type, from, to, sealed, keyPair) {
  const enc = unbase64(sealed?.enc), ct = unbase64(sealed?.ct);
  if (typeof sealed !== "object" || enc === null || ct === null || enc.length !== 32 || ct.length < 16) {
    throw new SealedError("malformed", "'sealed' needs base64 'enc' (32 bytes) and 'ct'");
  }
  if (!keyPair) throw new SealedError("does-not-open", "this client has no encryption key");
  const plaintext = await hpkeOpen(keyPair, enc, SEALED_INFO, sealedAad(type, from, to), ct);
  let inner, payload, sig;
  try {
    inner = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(plaintext));
    sig = unbase64(inner?.sig);
    if (typeof inner.body !== "string" || !Number.isSafeInteger(inner.ts) || !sig) throw new Error();
    payload = JSON.parse(inner.body);
  } catch {
    throw new SealedError("malformed", "the opened plaintext is not a sealed payload");
  }
  return { payload, body: inner.body, ts: inner.ts, sig, enc: base64(enc) };
}

function checkWindow(ts, now, maxAge, maxAhead) {
  if (!(now - maxAge <= ts && ts <= now + maxAhead)) {
    throw new SealedError("stale", `sealed ${now - ts} ms ago, outside the replay window`);
  }
}

/**
 * The `enc` of every sealed message opened within the window (ms): a second one is a
 * replay. Keyed on the decoded bytes. Bounded: past `capacity` the oldest is forgotten.
 */
export class ReplayGuard {
  constructor(windowMs = 360_000, capacity = 10_000) {
    this.window = windowMs;
    this.capacity = capacity;
    this._seen = new Map(); // canonical base64 enc -> when (ms)
  }

  check(enc, now = Date.now()) {
    for (const [key, at] of this._seen) {
      if (at >= now - this.window && this._seen.size < this.capacity) break;
      this._seen.delete(key);
    }
    if (this._seen.has(enc)) throw new SealedError("replayed", "this sealed message was delivered before");
    this._seen.set(enc, now);
  }
}

/**
 * Open a sealed relay as received (`from` as the server stamped it, `to` this client's
 * ID) with this client's X25519 `keyPair`, checked against the sender's Ed25519
 * `senderKey` (base64, raw bytes or CryptoKey). Returns `{payload, ts}`; throws
 * SealedError. `replayGuard` (a ReplayGuard) also refuses a replay.
 */
export async function openSealed(type, from, to, sealed, keyPair, senderKey,
  { now = Date.now(), maxAge = 300_000, maxAhead = 60_000, replayGuard } = {}) {
  const inner = await unseal(type, from, to, sealed, keyPair);
  if (!senderKey) throw new SealedError("unknown-sender", `no trusted identity key for ${from}`);
  if (!await ed25519Verify(senderKey, inner.sig, sealedText(type, from, to, inner.ts, inner.body))) {
    throw new SealedError("bad-signature", `not signed by ${from}'s identity key`);
  }
  checkWindow(inner.ts, now, maxAge, maxAhead);
  replayGuard?.check(inner.enc, now);
  return { payload: inner.payload, ts: inner.ts };
}

// ---- end of the sealed signaling section ------------------------------------------------

/** Users whose keys the client keeps (the oldest go first past this many). */
const PEERS_KEPT = 4096;
/**
 * Milliseconds before what is known of a user (keys, or that it has none, or that its
 * lookup failed) may be looked up again because of a relay received from it.
 */
const PEER_REFRESH_MS = 30_000;
/**
 * Lookups that received relays may cause per minute (the server allows 120 discovers a
 * minute, VOLLI_DISCOVER_PER_MINUTE): anyone can send relays, and they must not spend the
 * allowance this client needs for its own discovers.
 */
const INBOUND_LOOKUPS_PER_MINUTE = 30;


/**
 * @typedef {object} VolliOptions
 * @property {string} userId the user ID to register (required)
 * @property {CryptoKeyPair} [keyPair] Ed25519 key pair: registration is then signed
 * @property {string} [publicKey="unsigned"] `publicKey` of an unsigned registration (any
 *   base64 text; stored by the server and returned by `discover`)
 * @property {boolean} [reconnect=true] reconnect after an established session drops
 * @property {number} [pingInterval=20] seconds between application pings; 0 turns them off
 * @property {number} [pingTimeout=10] seconds without a pong before the socket is dropped
 * @property {number} [requestTimeout=10] seconds before a request promise rejects (`timeout`)
 * @property {number} [reconnectDelay=0.5] first reconnect delay in seconds (doubled each try)
 * @property {number} [maxReconnectDelay=30] cap of the reconnect delay in seconds
 * @property {CryptoKeyPair|false} [encryptionKeyPair] X25519 key pair whose public key a
 *   signed registration publishes (sealed signaling); generated (not extractable) on the
 *   first signed registration when absent; `false` publishes none
 * @property {"auto"|"always"|"never"} [seal="auto"] `auto`: seal relays when this client
 *   has a `keyPair` and the peer a verified encryption key, else send them in clear;
 *   `always`: never send or accept a relay in clear; `never`: never seal
 * @property {Object<string,string>} [pinnedKeys] userId -> base64 Ed25519 identity key
 *   trusted for that user instead of what `discover` says
 * @property {number} [sealMaxAge=300] seconds a sealed message may be old (raise with `hold`)
 * @property {number} [sealMaxAhead=60] seconds a sealed message may be from the future
 * @property {number} [replayMemory=10000] sealed messages remembered to refuse replays
 */

/**
 * A signaling connection for one user.
 *
 * Events (CustomEvent; the payload is `event.detail`, also passed to `on()` handlers):
 * - `open` `{url}`: the WebSocket opened (registration follows)
 * - `registered` `{userId, nonce?, reconnected}`: registered, first time or after a reconnect
 * - `offer`, `answer`, `ice-candidate`: relayed messages, with `from` set by the server
 * - `ice-servers` `{iceServers}`: ICE servers from the server (also in `.iceServers`)
 * - `error`: a server error not tied to a pending request (e.g. `peer-offline` for a relay),
 *   or a registration failure that stopped the client; detail is the error message. Also
 *   `{code: "message-too-large", size, maxMessageSize, requestId, request}` for a relay
 *   not sent because it (sealed or not) exceeds the server's `maxMessageSize`
 * - `session-replaced` `{code?, reason?}`: another connection took over this user ID
 * - `reconnecting` `{attempt, delay}`: a reconnect is scheduled in `delay` seconds
 * - `close` `{code, reason, willReconnect}`: the WebSocket closed
 * - `statechange` `{state}`: `.state` changed
 * - `message`: every message from the server, before any other handling
 * - `sent` `{type, to, requestId, sealed}`: a relay went out (sealed or in clear)
 * - `sealed-error` `{reason, from, type, message}`: a received sealed relay was refused
 *   (never delivered); `{reason, to, type, requestId, message}`: a relay was not sent
 *   (`seal: "always"` and no verified key for `to`)
 * - `key-mismatch` `{userId, reason, publicKey, ...}`: `discover` gave an identity key
 *   other than the pinned one (`pinned-key`), or an encryption key whose signature does
 *   not verify (`bad-encryption-key-signature`); that key is not used
 */
export class VolliSignaling extends EventTarget {
  /**
   * @param {string|null} url `ws://host/signaling`; null for {@link defaultUrl}
   * @param {VolliOptions} options
   */
  constructor(url, options) {
    super();
    if (!options?.userId) throw new TypeError("options.userId is required");
    this.url = url || defaultUrl();
    this.userId = options.userId;
    this.keyPair = options.keyPair ?? null;
    this.publicKey = options.publicKey ?? "unsigned";
    this.reconnect = options.reconnect ?? true;
    this.pingInterval = options.pingInterval ?? 20;
    this.pingTimeout = options.pingTimeout ?? 10;
    this.requestTimeout = options.requestTimeout ?? 10;
    this.reconnectDelay = options.reconnectDelay ?? 0.5;
    this.maxReconnectDelay = options.maxReconnectDelay ?? 30;
    this.seal = options.seal ?? "auto";
    if (!["auto", "always", "never"].includes(this.seal)) {
      throw new TypeError('options.seal must be "auto", "always" or "never"');
    }
    if (this.seal === "always" && !this.keyPair) {
      throw new TypeError('seal: "always" needs a keyPair (sealed relays are signed)');
    }
    /** X25519 key pair for sealed relays (null until generated; false: none). */
    this.encryptionKeyPair = options.encryptionKeyPair ?? null;
    this.sealMaxAge = options.sealMaxAge ?? 300;
    this.sealMaxAhead = options.sealMaxAhead ?? 60;
    this._replay = new ReplayGuard((this.sealMaxAge + this.sealMaxAhead) * 1000,
      options.replayMemory ?? 10_000);
    this._pins = new Map(Object.entries(options.pinnedKeys ?? {}));
    // userId -> {identityKey, encryptionKey, at} from discover (or a pin); identityKey null:
    // no verified key, or (failed: true) the lookup failed. At most PEERS_KEPT.
    this._peers = new Map();
    this._inboundLookups = { tokens: INBOUND_LOOKUPS_PER_MINUTE, at: Date.now() };
    /** The largest message the server takes, in bytes (from `hello`); null: unknown. */
    this.maxMessageSize = null;
    this._lookups = new Map(); // userId -> promise of a discover in flight
    this._outbound = new Map(); // userId -> tail of its chain of relays being sealed
    this._inbound = new Map(); // userId -> tail of its chain of relays being opened
    /** `idle`, `connecting`, `registered`, `reconnecting` or `closed`. */
    this.state = "idle";
    /** ICE servers from the last `ice-servers` message (RTCPeerConnection's shape). */
    this.iceServers = [];
    /** The nonce the next signed operation signs. */
    this.nonce = null;
    this._ws = null;
    this._pending = new Map(); // requestId -> {resolve, reject, timer, expects}
    this._relays = new Map(); // recent relay requestIds -> {type, to}, to explain errors
    this._watched = new Set(); // userIds to watch again after a reconnect
    /** Watched userIds -> online, as last reported by `watching` or `presence`. */
    this.presence = new Map();
    this._nextId = 1;
    this._attempt = 0;
    this._timer = null; // reconnect timer
    this._pinger = null;
    this._ready = null; // {promise, resolve, reject} of connect()
    this._established = false; // registered at least once since connect()
    this._stopped = false; // close() called, session replaced or fatal error
  }

  /**
   * Subscribe to an event; `handler(detail, event)`. Returns a function that unsubscribes.
   * @param {string} type
   * @param {(detail: any, event: CustomEvent) => void} handler
   */
  on(type, handler) {
    const listener = (event) => handler(event.detail, event);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  /**
   * Open the connection and register. Resolves with the `registered` message; rejects
   * (VolliError) if the first attempt fails: the socket closes first (`connect-failed`)
   * or `register` is refused (the server's code, e.g. `user-id-taken`). Reconnects only
   * happen after a session has been established.
   * @returns {Promise<object>}
   */
  connect() {
    if (this._ready && this.state !== "closed") return this._ready.promise;
    let resolve, reject;
    const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
    promise.catch(() => {}); // callers that ignore the result must not see unhandled rejections
    this._ready = { promise, resolve, reject };
    this._established = false;
    this._stopped = false;
    this._attempt = 0;
    this._open();
    return promise;
  }

  /** Close for good: no reconnect. Pending requests reject with `disconnected`. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    const ws = this._ws;
    if (ws) {
      try { ws.close(1000, "client closing"); } catch { /* already closing */ }
      this._closed(ws, 1000, "closed by client");
    } else if (this.state !== "closed") { // idle, or waiting to reconnect
      this._ready?.reject(new VolliError("closed", "closed by client"));
      this._setState("closed");
      this._emit("close", { code: 1000, reason: "closed by client", willReconnect: false });
    }
  }

  /**
   * Look a user up. Resolves with the `discover-response` `{userId, online, publicKey,
   * verified, encryptionKey, encryptionKeySignature}`. A verified identity key (or the
   * pinned one) and an encryption key it signed are remembered for sealing.
   * @param {string} userId
   * @returns {Promise<object>}
   */
  async discover(userId) {
    const reply = await this.request({ type: "discover", userId });
    await this._notePeer(userId, reply);
    return reply;
  }

  /**
   * Trust `publicKey` (base64 Ed25519) as `userId`'s identity key, whatever `discover`
   * says: a different discovered key is refused (`key-mismatch`). Null unpins.
   * @param {string} userId
   * @param {string|null} publicKey
   */
  pinKey(userId, publicKey) {
    if (publicKey) this._pins.set(userId, publicKey);
    else this._pins.delete(userId);
    this._peers.delete(userId);
  }

  /**
   * Whether a relay to `userId` would be sealed now (from what is known without a
   * discover): this client signs and has a verified encryption key for `userId`.
   * @param {string} userId
   */
  canSeal(userId) {
    return this._sealing() && !!this._peers.get(userId)?.encryptionKey;
  }

  /**
   * Subscribe to the presence of `userIds` (docs/protocol.md, section 5b). Resolves with
   * the `watching` reply's list `[{userId, online, verified}]`; each change then fires a
   * `presence` event `{userId, online}` (offline only once it lasted the server's
   * debounce). Watches are made again after a reconnect: a `presence` event then reports
   * each user whose state changed meanwhile.
   * @param {string[]} userIds
   * @returns {Promise<object[]>}
   */
  async watch(userIds) {
    const reply = await this.request({ type: "watch", userIds });
    for (const id of userIds) this._watched.add(id);
    this._noteWatching(reply.presence, false);
    return reply.presence;
  }

  /**
   * Stop watching `userIds`.
   * @param {string[]} userIds
   * @returns {Promise<void>}
   */
  async unwatch(userIds) {
    for (const id of userIds) {
      this._watched.delete(id);
      this.presence.delete(id);
    }
    await this.request({ type: "unwatch", userIds });
  }

  /**
   * Let the server wake this browser with Web Push when an offer is held for this user
   * (docs/protocol.md section 5d). Needs a signed registration, a server with a VAPID key,
   * and a service worker `registration` whose `push` handler shows the call (the demo's:
   * /demo-sw.js). Asks for notification permission if needed. Resolves with the
   * PushSubscription; rejects with `push-disabled`, `unsupported` or the server's code.
   * @param {ServiceWorkerRegistration} registration
   * @returns {Promise<PushSubscription>}
   */
  async subscribePush(registration) {
    if (!registration?.pushManager) throw new VolliError("unsupported", "no Push API here");
    const response = await fetch(new URL("/push/vapid-public-key", httpBase(this.url)));
    if (!response.ok) throw new VolliError("push-disabled", "this server sends no pushes");
    const { publicKey } = await response.json();
    const subscription = await registration.pushManager.getSubscription() ??
      await registration.pushManager.subscribe({
        userVisibleOnly: true, applicationServerKey: fromBase64url(publicKey) });
    await this.pushSubscribe(subscription.toJSON());
    return subscription;
  }

  /**
   * Send a `push-subscribe` with a `PushSubscription.toJSON()` (what `subscribePush`
   * does once it has one). Resolves with `push-subscribed`.
   * @param {object} subscription
   */
  pushSubscribe(subscription) {
    return this.request({ type: "push-subscribe", subscription });
  }

  /**
   * Stop pushes to `endpoint` (a PushSubscription's). Resolves with `push-unsubscribed`.
   * @param {string} endpoint
   */
  pushUnsubscribe(endpoint) {
    return this.request({ type: "push-unsubscribe", endpoint });
  }

  /**
   * Ask for ICE servers (a fresh TURN credential when the server has TURN). Resolves with
   * the list, `[]` without TURN; also updates `.iceServers` and fires `ice-servers`.
   * @returns {Promise<RTCIceServer[]>}
   */
  async requestIceServers() {
    return (await this.request({ type: "ice-servers" })).iceServers ?? [];
  }

  /**
   * An application-level ping. Resolves with the round-trip time in milliseconds.
   * @param {number} [timeout] seconds
   * @returns {Promise<number>}
   */
  async ping(timeout = this.requestTimeout) {
    const start = performance.now();
    await this.request({ type: "ping" }, timeout);
    return performance.now() - start;
  }

  /**
   * Bind a new key to this user ID (docs/protocol.md, section 3a). Only on a connection
   * registered with a signature; later registrations (reconnects) sign with the new key.
   * @param {CryptoKeyPair} newKeyPair
   * @returns {Promise<object>} the `key-rotated` reply
   */
  async rotateKey(newKeyPair) {
    if (!this.keyPair) throw new VolliError("signature-required", "not registered with a key");
    const newPublicKey = await exportPublicKey(newKeyPair.publicKey);
    const signature = await sign(this.keyPair.privateKey,
      `${ROTATE_CONTEXT}\n${this.nonce}\n${this.userId}\n${newPublicKey}`);
    const message = { type: "rotate-key", newPublicKey, signature };
    // The published encryption key, signed again by the new identity key.
    Object.assign(message, await this._encryptionFields(newKeyPair));
    const reply = await this.request(message);
    this.keyPair = newKeyPair;
    if (reply.nonce) this.nonce = reply.nonce;
    return reply;
  }

  /**
   * Relay an offer to `to`. Returns the requestId it carries; a failure (e.g.
   * `peer-offline`) arrives as an `error` event whose detail has this `requestId` and
   * `request: {type, to}`. Throws `not-connected` unless registered.
   * With `{hold: seconds}`, an offer to an offline `to` is held for it (docs/protocol.md
   * section 5c): a `held` event (`{to, expiresIn, requestId}`), then `delivered` when
   * `to` registers and gets it (with the candidates sent meanwhile), or `expired`.
   * @param {string} to
   * @param {RTCSessionDescriptionInit|RTCSessionDescription} offer
   * @param {{hold?: number}} [options]
   */
  sendOffer(to, offer, options = {}) {
    const fields = { offer: toJSON(offer) };
    if (options.hold) fields.hold = options.hold;
    return this._relay("offer", to, fields);
  }

  /** Relay an answer to `to`; as {@link VolliSignaling#sendOffer}. */
  sendAnswer(to, answer) {
    return this._relay("answer", to, { answer: toJSON(answer) });
  }

  /**
   * Relay an ICE candidate to `to`: an RTCIceCandidate (sent as `.toJSON()`), a plain
   * RTCIceCandidateInit, or null for end of candidates. As {@link VolliSignaling#sendOffer}.
   */
  sendCandidate(to, candidate) {
    return this._relay("ice-candidate", to, { candidate: toJSON(candidate) ?? null });
  }

  /**
   * Send a request and resolve with the direct reply carrying its requestId (for the
   * request types of docs/protocol.md, only the reply of that type; otherwise any direct
   * reply type); reject with a VolliError carrying the server's `code` on an `error`
   * reply, `timeout` after `timeout` seconds, `disconnected` if the socket closes first,
   * `message-too-large` (not sent) when larger than the server's `maxMessageSize`.
   * Relayed messages never settle a request, whatever `requestId` they carry.
   * @param {object} message
   * @param {number} [timeout] seconds
   * @returns {Promise<object>}
   */
  request(message, timeout = this.requestTimeout) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new VolliError("not-connected", "the connection is not open"));
    }
    const requestId = this._nextId++;
    let text;
    try {
      text = JSON.stringify({ ...message, requestId });
      this._checkSize(text, message.type);
    } catch (err) { // before anything is pending
      return Promise.reject(err);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(requestId);
        reject(new VolliError("timeout", `no reply to ${message.type} within ${timeout}s`));
      }, timeout * 1000);
      this._pending.set(requestId, { resolve, reject, timer, expects: REPLY_FOR[message.type] });
      ws.send(text);
    });
  }

  /**
   * Send any message as is (JSON). Throws `not-connected` if the socket is not open, and
   * `message-too-large` (nothing sent, the connection stays open) if its JSON text has
   * more UTF-8 bytes than the server's `maxMessageSize`.
   * @param {object} message
   */
  send(message) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      throw new VolliError("not-connected", "the connection is not open");
    }
    const text = JSON.stringify(message);
    this._checkSize(text, message?.type);
    ws.send(text);
  }

  /** Throws `message-too-large` when `text` exceeds the server's `maxMessageSize`. */
  _checkSize(text, type) {
    const max = this.maxMessageSize;
    if (max == null || text.length <= max / 3) return; // at most 3 bytes per UTF-16 unit
    const size = utf8(text).length;
    if (size > max) {
      throw Object.assign(new VolliError("message-too-large",
        `${type ?? "message"} of ${size} bytes: the server takes at most ${max}`),
      { size, maxMessageSize: max });
    }
  }

  // ---- internals -------------------------------------------------------------------------

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("statechange", { state });
  }

  _relay(type, to, fields) {
    if (this.state !== "registered") {
      throw new VolliError("not-connected", `cannot send ${type}: not registered`);
    }
    const requestId = this._nextId++;
    this._relays.set(requestId, { type, to });
    if (this._relays.size > 256) this._relays.delete(this._relays.keys().next().value);
    const message = { type, to, ...fields, requestId };
    if (!this._sealing() && !this._outbound.has(to)) {
      try {
        this.send(message);
      } catch (err) {
        if (err.code !== "message-too-large") throw err;
        // Reported as a failed relay, once the caller has its requestId.
        queueMicrotask(() => this._emit("error", { code: err.code, message: err.message,
          size: err.size, maxMessageSize: err.maxMessageSize, requestId, request: { type, to } }));
        return requestId;
      }
      this._emit("sent", { type, to, requestId, sealed: false });
      return requestId;
    }
    // Sealing may need a discover first: relays to one peer keep their order in a chain.
    this._chain(this._outbound, to, () => this._sendSealed(message));
    return requestId;
  }

  /** Whether relays are sealed when the peer allows it. */
  _sealing() {
    return this.seal !== "never" && !!this.keyPair;
  }

  /** Run `task` after the ones queued for `userId` in `chains`; the chain ends when idle. */
  _chain(chains, userId, task) {
    // Whatever a task throws, the chain goes on: later relays of this peer still run.
    const tail = (chains.get(userId) ?? Promise.resolve()).then(task).catch((err) => {
      try {
        this._emit("error", { code: err?.code ?? "internal", message: String(err?.message ?? err) });
      } catch { /* nothing more to do */ }
    });
    chains.set(userId, tail);
    tail.then(() => { if (chains.get(userId) === tail) chains.delete(userId); });
  }

  async _sendSealed(message) {
    const { type, to, requestId } = message;
    const field = PAYLOAD_FIELD[type];
    let peer = null;
    if (this._sealing()) {
      // An offer or an answer (once per call, this client's own doing) starts afresh: the
      // peer may have a new encryption key since. A failed lookup leaves what was known.
      peer = await this._peerInfo(to, { fresh: type !== "ice-candidate" }).catch(() => null);
    }
    let out = message;
    if (peer?.encryptionKey) {
      const { [field]: payload, ...rest } = message;
      const sealed = await sealPayload(type, this.userId, to, payload, peer.encryptionKey,
        this.keyPair.privateKey);
      out = { ...rest, sealed };
    } else if (this.seal === "always") {
      this._emit("sealed-error", { reason: "no-encryption-key", to, type, requestId,
        message: `${to} has no verified encryption key: not sent in clear (seal: "always")` });
      return;
    }
    try {
      this.send(out);
    } catch (err) {
      this._emit("error", { code: err.code, message: err.message, size: err.size,
        maxMessageSize: err.maxMessageSize, requestId, request: { type, to } });
      return;
    }
    this._emit("sent", { type, to, requestId, sealed: out !== message });
  }

  /**
   * What is known of `userId` for sealing (`{identityKey, encryptionKey, at}`, either key
   * possibly null), with a discover when:
   * - nothing is known, or all that is known is that it has no verified key (or that its
   *   lookup failed) and that is PEER_REFRESH_MS old;
   * - `fresh` (an offer being sent);
   * - `refresh` (a received offer, a signature that fails) and it is PEER_REFRESH_MS old.
   * `inbound`: for a received relay, so within INBOUND_LOOKUPS_PER_MINUTE.
   * A failed discover keeps what was known (a failure of an unknown user is remembered
   * as `{identityKey: null, failed: true}`). Null when nothing is known.
   */
  async _peerInfo(userId, { fresh = false, refresh = false, inbound = false } = {}) {
    const known = this._peers.get(userId) ?? null;
    const now = Date.now();
    const old = known && now - known.at >= PEER_REFRESH_MS;
    if (known && !fresh && !(old && (refresh || known.failed || !known.identityKey))) return known;
    if (inbound && !this._takeInboundLookup(now)) return known;
    let lookup = this._lookups.get(userId);
    if (!lookup) {
      lookup = this.discover(userId).finally(() => this._lookups.delete(userId));
      this._lookups.set(userId, lookup);
    }
    try {
      await lookup;
    } catch {
      const current = this._peers.get(userId) ?? null;
      // Noted meanwhile by another lookup, or a verified key known before: kept as is.
      if (current !== known || current?.identityKey) return current;
      // Nothing verified known: the failure is remembered for PEER_REFRESH_MS.
      this._rememberPeer(userId, { identityKey: this._pins.get(userId) ?? null,
        encryptionKey: null, failed: true });
    }
    return this._peers.get(userId) ?? null;
  }

  /** Whether a received relay may cause a lookup now (a token bucket). */
  _takeInboundLookup(now) {
    const bucket = this._inboundLookups;
    bucket.tokens = Math.min(INBOUND_LOOKUPS_PER_MINUTE,
      bucket.tokens + (now - bucket.at) * INBOUND_LOOKUPS_PER_MINUTE / 60_000);
    bucket.at = now;
    if (bucket.tokens < 1) return false;
    bucket.tokens -= 1;
    return true;
  }

  /** Keep `entry` for `userId`, stamped now (the newest last; past PEERS_KEPT the oldest go). */
  _rememberPeer(userId, entry) {
    this._peers.delete(userId);
    while (this._peers.size >= PEERS_KEPT) this._peers.delete(this._peers.keys().next().value);
    this._peers.set(userId, { ...entry, at: Date.now() });
  }

  /**
   * Remember the keys of a `discover-response` for `userId` (the user asked), once checked
   * (docs/protocol.md 5e). A reply about another user, or with no string key, proves
   * nothing: no keys (but a pin).
   */
  async _notePeer(userId, reply) {
    if (typeof userId !== "string") return;
    const about = reply?.userId === userId;
    const publicKey = about && typeof reply.publicKey === "string" ? reply.publicKey : null;
    const pinned = this._pins.get(userId) ?? null;
    let identityKey = about && reply.verified === true ? publicKey : null;
    if (pinned) {
      if (publicKey && publicKey !== pinned) {
        this._emit("key-mismatch", { userId, reason: "pinned-key", publicKey,
          pinnedKey: pinned, message: `the server gave ${userId} another identity key than the pinned one` });
        this._rememberPeer(userId, { identityKey: pinned, encryptionKey: null });
        return;
      }
      identityKey = pinned;
    }
    let encryptionKey = null;
    if (identityKey && about && reply.encryptionKey != null) {
      const raw = unbase64(reply.encryptionKey);
      const signature = unbase64(reply.encryptionKeySignature);
      if (raw?.length === 32 && signature && await ed25519Verify(identityKey, signature,
        `${ENCRYPTION_KEY_CONTEXT}\n${userId}\n${reply.encryptionKey}`)) {
        encryptionKey = raw;
      } else {
        this._emit("key-mismatch", { userId, reason: "bad-encryption-key-signature",
          publicKey: identityKey, encryptionKey: reply.encryptionKey,
          message: `${userId}'s encryption key is not signed by its identity key: not used` });
      }
    }
    this._rememberPeer(userId, { identityKey, encryptionKey });
  }

  /** `encryptionKey` and `encryptionKeySignature` signed by `keyPair`, or nothing. */
  async _encryptionFields(keyPair) {
    if (!keyPair || this.encryptionKeyPair === false) return {};
    this.encryptionKeyPair ??= await generateEncryptionKeyPair();
    const encryptionKey = base64(await subtle().exportKey("raw", this.encryptionKeyPair.publicKey));
    return { encryptionKey,
      encryptionKeySignature: await signEncryptionKey(keyPair.privateKey, this.userId, encryptionKey) };
  }

  /** A relayed offer, answer or candidate: opened if sealed, delivered in order per sender. */
  _inboundRelay(msg) {
    const from = msg.from;
    const sealed = msg.sealed != null;
    if (!sealed && !this._inbound.has(from)) {
      this._deliverPlain(msg);
      return;
    }
    this._chain(this._inbound, from, () => (sealed ? this._openRelay(msg) : this._deliverPlain(msg)));
  }

  _deliverPlain(msg) {
    if (this.seal === "always") {
      this._emit("sealed-error", { reason: "not-sealed", from: msg.from, type: msg.type,
        message: 'a relay in clear, refused (seal: "always")' });
      return;
    }
    this._emit(msg.type, { ...msg, sealed: false });
  }

  async _openRelay(msg) {
    const { type, from } = msg;
    try {
      if (typeof from !== "string") throw new SealedError("malformed", "no sender ('from')");
      const now = Date.now();
      // Opened first: junk (not sealed to this client) costs no lookup.
      const inner = await unseal(type, from, this.userId, msg.sealed, this.encryptionKeyPair || null);
      if (!payloadFits(type, inner.payload)) { // what the server requires of a relay in clear
        throw new SealedError("malformed", `a sealed ${type} whose payload is ${Array.isArray(
          inner.payload) ? "an array" : inner.payload === null ? "null" : `a ${typeof inner.payload}`}`);
      }
      const text = sealedText(type, from, this.userId, inner.ts, inner.body);
      // The sender's identity key: pinned, or discovered (verified). Looked up when not
      // known; a received offer, or a signature that fails with the remembered key (a
      // rotated key), looks it up again if what is known is PEER_REFRESH_MS old: the
      // answer to an offer is sealed to the encryption key found then.
      const lookup = (refresh) => this._peerInfo(from, { refresh, inbound: true }).catch(() => null);
      let peer = await lookup(type === "offer");
      let ok = !!peer?.identityKey && await ed25519Verify(peer.identityKey, inner.sig, text);
      if (!ok && peer?.identityKey && !this._pins.has(from)) {
        const fresher = await lookup(true);
        if (fresher !== peer) {
          peer = fresher;
          ok = !!peer?.identityKey && await ed25519Verify(peer.identityKey, inner.sig, text);
        }
      }
      if (!peer?.identityKey) throw new SealedError("unknown-sender", `no verified identity key for ${from}`);
      if (!ok) throw new SealedError("bad-signature", `not signed by ${from}'s identity key`);
      checkWindow(inner.ts, now, this.sealMaxAge * 1000, this.sealMaxAhead * 1000);
      this._replay.check(inner.enc, now);
      const { sealed, ...rest } = msg;
      this._emit(type, { ...rest, [PAYLOAD_FIELD[type]]: inner.payload, sealed: true });
    } catch (err) {
      this._emit("sealed-error", { reason: err instanceof SealedError ? err.reason : "malformed",
        from, type, message: String(err?.message ?? err) });
    }
  }

  _open() {
    this._setState(this._established ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) { // e.g. a malformed URL
      this._stopped = true;
      this._setState("closed");
      this._ready?.reject(new VolliError("connect-failed", String(err)));
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._emit("open", { url: this.url });
    ws.onmessage = (event) => this._received(ws, event.data);
    ws.onclose = (event) => this._closed(ws, event.code, event.reason);
  }

  _received(ws, data) {
    if (ws !== this._ws) return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return; // the server only sends JSON text; ignore anything else
    }
    if (msg === null || typeof msg !== "object") return;
    this._emit("message", msg);
    const pending = this._settles(msg);
    if (pending) {
      this._pending.delete(msg.requestId);
      clearTimeout(pending.timer);
    }
    switch (msg.type) {
      case "hello":
        this.nonce = msg.nonce;
        this.maxMessageSize = Number.isSafeInteger(msg.maxMessageSize) && msg.maxMessageSize > 0
          ? msg.maxMessageSize : null;
        this._register(ws);
        return;
      case "offer":
      case "answer":
      case "ice-candidate":
        this._inboundRelay(msg);
        return;
      case "ice-servers":
        this.iceServers = msg.iceServers ?? [];
        this._emit("ice-servers", msg);
        break;
      case "presence":
        if (this._watched.has(msg.userId)) this._notePresence(msg.userId, msg.online);
        return;
      case "held":
      case "delivered":
      case "expired":
        this._emit(msg.type, msg);
        return;
      case "session-replaced":
        this._stopped = true;
        this._emit("session-replaced", msg);
        return;
      case "error":
        if (pending) {
          pending.reject(new VolliError(msg.code, msg.message, msg));
        } else {
          this._emit("error", { ...msg, request: this._relays.get(msg.requestId) });
        }
        return;
    }
    pending?.resolve(msg);
  }

  _notePresence(userId, online) {
    if (this.presence.get(userId) === online) return;
    this.presence.set(userId, online);
    this._peers.delete(userId); // it may come back with another encryption key
    this._emit("presence", { type: "presence", userId, online });
  }

  /** A `watching` list: remembered; after a reconnect (`report`), changes are events. */
  _noteWatching(list, report) {
    for (const { userId, online } of list ?? []) {
      if (!this._watched.has(userId)) continue;
      if (report) this._notePresence(userId, online);
      else this.presence.set(userId, online);
    }
  }

  async _watchAgain(ws) {
    const ids = [...this._watched];
    // The server takes at most 1000 per message (and VOLLI_WATCH_MAX in all).
    for (let i = 0; i < ids.length && ws === this._ws; i += 1000) {
      try {
        const reply = await this.request({ type: "watch", userIds: ids.slice(i, i + 1000) });
        this._noteWatching(reply.presence, true);
      } catch (err) {
        if (ws === this._ws) this._emit("error", err.reply ?? { code: err.code, message: err.message });
        return;
      }
    }
  }

  /** The pending request `msg` answers, if it is a direct reply that fits that request. */
  _settles(msg) {
    if (!REPLY_TYPES.has(msg?.type) || msg.requestId == null) return undefined;
    const pending = this._pending.get(msg.requestId);
    if (!pending || (msg.type !== "error" && pending.expects && msg.type !== pending.expects)) {
      return undefined; // a reply that does not fit leaves the request to its timeout
    }
    return pending;
  }

  async _register(ws) {
    try {
      const message = { type: "register", userId: this.userId, publicKey: this.publicKey };
      if (this.keyPair) {
        message.publicKey = await exportPublicKey(this.keyPair.publicKey);
        message.signature = await signRegistration(this.keyPair.privateKey, this.nonce,
          this.userId);
        Object.assign(message, await this._encryptionFields(this.keyPair));
      }
      if (ws !== this._ws) return;
      const reply = await this.request(message);
      if (ws !== this._ws) return;
      if (reply.nonce) this.nonce = reply.nonce;
      const reconnected = this._established;
      this._established = true;
      this._attempt = 0;
      this._setState("registered");
      this._startPinging(ws);
      this._emit("registered", { ...reply, reconnected });
      this._ready.resolve(reply);
      if (reconnected && this._watched.size) this._watchAgain(ws);
    } catch (err) {
      if (ws !== this._ws) return; // the socket closed meanwhile: _closed() decides
      if (!this._established || !RETRYABLE_REGISTER_ERRORS.has(err.code)) {
        this._stopped = true; // a refusal that retrying would not change
        this._ready.reject(err);
        if (this._established) this._emit("error", err.reply ?? { code: err.code, message: err.message });
      }
      try { ws.close(1000, "register failed"); } catch { /* closing */ }
      this._closed(ws, 1000, `register failed: ${err.code}`);
    }
  }

  _startPinging(ws) {
    clearInterval(this._pinger);
    if (!this.pingInterval) return;
    this._pinger = setInterval(() => {
      this.ping(this.pingTimeout).catch((err) => {
        if (err.code === "timeout" && ws === this._ws) {
          // A dead TCP path can take minutes to show up as a close: drop it now.
          try { ws.close(); } catch { /* closing */ }
          this._closed(ws, 1006, "pong timeout");
        }
      });
    }, this.pingInterval * 1000);
  }

  _closed(ws, code, reason) {
    if (ws !== this._ws) return; // a socket we already gave up on
    this._ws = null;
    ws.onopen = ws.onmessage = ws.onclose = null;
    clearInterval(this._pinger);
    for (const { reject, timer } of this._pending.values()) {
      clearTimeout(timer);
      reject(new VolliError("disconnected", `connection closed (${code})`));
    }
    this._pending.clear();
    if (code === 4000 && !this._stopped) { // takeover without the message (Redis outage)
      this._emit("session-replaced", { code, reason });
    }
    if (NO_RECONNECT_CODES.includes(code)) this._stopped = true;
    const willReconnect = this.reconnect && this._established && !this._stopped;
    if (!this._established) {
      this._ready.reject(new VolliError("connect-failed",
        `connection closed before registering (${code}${reason ? ` ${reason}` : ""})`));
    }
    this._setState(willReconnect ? "reconnecting" : "closed");
    this._emit("close", { code, reason, willReconnect });
    if (willReconnect) this._scheduleReconnect();
  }

  _scheduleReconnect() {
    const base = Math.min(this.maxReconnectDelay, this.reconnectDelay * 2 ** this._attempt);
    const delay = base / 2 + Math.random() * base / 2; // "equal jitter"
    this._attempt += 1;
    this._emit("reconnecting", { attempt: this._attempt, delay });
    clearTimeout(this._timer);
    this._timer = setTimeout(() => {
      if (!this._stopped) this._open();
    }, delay * 1000);
  }
}

export default VolliSignaling;
