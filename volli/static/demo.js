// The Volli demo page: two people connect, one calls the other, and they chat over a
// WebRTC data channel. Volli carries only the signaling (offer, answer, ICE candidates).
// Negotiation follows the "perfect negotiation" pattern, so adding the camera mid-call
// renegotiates from either side; the caller's data channel starts the first offer.
// A new caller is answered only after the user clicks Accept (see askToAnswer).
// Signaling is sealed (docs/protocol.md 5e) whenever both sides register signed: the server
// relays the offer, answer and candidates without being able to read them.
import { VolliSignaling, generateKeyPair, generateEncryptionKeyPair } from "/volli-signaling.js";

const $ = (id) => document.getElementById(id);

/** @type {VolliSignaling|null} */
let sig = null;
/** The current call: {peer, pc, dc, polite, makingOffer, ignoreOffer, queued, connected, ended} */
let call = null;
/** @type {MediaStream|null} */
let localStream = null;
/** A call waiting for Accept or Decline: {peer, offer, queued}. It has no RTCPeerConnection
 * yet, so nothing (answer, candidates, media) reaches the caller before the user accepts. */
let incoming = null;
/** Seconds the server holds our call's first offer if the callee is offline. */
const HOLD_SECONDS = 60;
/** The contact whose presence is shown (watched on the server, live). */
let watchedPeer = null;

// ---- small UI helpers -------------------------------------------------------------------

function randomId() {
  // crypto.getRandomValues works on plain http too (randomUUID needs a secure context).
  const bytes = crypto.getRandomValues(new Uint8Array(3));
  return "user-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function log(text, cls = "") {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  if (cls) li.className = cls;
  const list = $("log");
  list.append(li);
  while (list.children.length > 200) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function setCallStatus(state, text) {
  $("call-status").dataset.state = state;
  $("call-status").textContent = text;
}

function addMessage(cls, who, text) {
  const li = document.createElement("li");
  li.className = cls;
  if (who) {
    const name = document.createElement("span");
    name.className = "who";
    name.textContent = who;
    li.append(name);
  }
  li.append(document.createTextNode(text));
  $("messages").append(li);
  $("messages").scrollTop = $("messages").scrollHeight;
}

function updateButtons() {
  const registered = sig?.state === "registered";
  $("connect").disabled = !!sig;
  $("user-id").disabled = !!sig;
  $("sign").disabled = !!sig || $("sign").dataset.unsupported === "1";
  $("disconnect").disabled = !sig;
  $("call").disabled = !registered;
  $("push").disabled = !registered || !sig?.keyPair || !("serviceWorker" in navigator);
  $("hangup").disabled = !call;
  const open = !!call?.connected && call.dc?.readyState === "open";
  $("chat-input").disabled = !open;
  $("send").disabled = !open;
}

function relay(send) {
  try {
    send();
  } catch (err) {
    log(`could not send: ${err.code ?? ""} ${err.message}`, "err");
  }
}

// ---- identity: one Ed25519 key per browser profile, kept in IndexedDB -------------------

function keyStore(mode, action) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open("volli-demo", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("keys");
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const db = open.result;
      const tx = db.transaction("keys", mode);
      const request = action(tx.objectStore("keys"));
      tx.oncomplete = () => { db.close(); resolve(request.result); };
      tx.onerror = () => { db.close(); reject(tx.error); };
    };
  });
}

async function storedKey(name, generate) {
  let keyPair = await keyStore("readonly", (s) => s.get(name)).catch(() => undefined);
  if (!keyPair) {
    keyPair = await generate(); // private key not extractable; IndexedDB stores it as is
    await keyStore("readwrite", (s) => s.put(keyPair, name)).catch(() => {});
  }
  return keyPair;
}

/** The Ed25519 identity key (signed registration). */
const identityKey = () => storedKey("identity", generateKeyPair);
/** The X25519 key sealed messages are encrypted to. Kept too, so that an offer sealed to
 * it and held by the server while this page was closed still opens after a reload. */
const encryptionKey = () => storedKey("encryption", generateEncryptionKeyPair);

async function checkSigning() {
  let why = "";
  if (!window.isSecureContext || !crypto.subtle) {
    why = "(needs https or localhost)";
  } else {
    try {
      await generateKeyPair();
    } catch {
      why = "(this browser has no Ed25519 in WebCrypto)";
    }
  }
  if (why) {
    $("sign").checked = false;
    $("sign").dataset.unsupported = "1";
    $("sign").disabled = true;
    $("sign-note").textContent = why;
  }
}

// ---- signaling --------------------------------------------------------------------------

async function connect(event) {
  event.preventDefault();
  const userId = $("user-id").value.trim();
  if (!userId || sig) return;
  let keyPair = null, encryptionKeyPair = null;
  if ($("sign").checked) {
    try {
      keyPair = await identityKey();
      encryptionKeyPair = await encryptionKey().catch(() => null); // null: the client makes one
    } catch (err) {
      setStatus("error", `No signing key: ${err.message}`);
      return;
    }
  }
  const s = new VolliSignaling(null, { userId, keyPair, encryptionKeyPair, seal: "auto" });
  sig = s;
  wire(s);
  updateButtons();
  setStatus("connecting", "Connecting…");
  try {
    await s.connect();
  } catch (err) {
    if (sig === s || sig === null) { // (the close event may have cleared it already)
      sig = null;
      setStatus("error", `Could not register: ${err.code}: ${err.message}`);
      updateButtons();
    }
    return;
  }
  try {
    const servers = await s.requestIceServers();
    log(`ICE servers from Volli: ${servers.length ? servers.map((x) => x.urls).join(", ") : "none (direct connections only)"}`);
  } catch (err) {
    log(`ice-servers failed: ${err.code}`, "err");
  }
}

function disconnect() {
  dropIncoming();
  endCall("You disconnected");
  if (sig) {
    const s = sig;
    sig = null;
    s.close();
  }
  setStatus("idle", "Not connected");
  updateButtons();
}

function wire(s) {
  const mine = (handler) => (detail) => { if (s === sig) handler(detail); };
  s.on("open", mine(() => log(`WebSocket open: ${s.url}`)));
  s.on("registered", mine((msg) => {
    const how = s.keyPair ? "signed" : "unsigned";
    setStatus("registered", `Registered as ${msg.userId} (${how})`);
    log(`registered as ${msg.userId} (${how})${msg.reconnected ? " again after a reconnect" : ""}`);
    updateButtons();
    if (!msg.reconnected) {
      watchedPeer = null; // a new connection watches nothing yet
      watchPeer();
    }
  }));
  s.on("reconnecting", mine(({ attempt, delay }) => {
    setStatus("reconnecting", `Connection lost: reconnecting in ${delay.toFixed(1)} s (attempt ${attempt})`);
    updateButtons();
  }));
  s.on("close", mine(({ code, reason, willReconnect }) => {
    log(`WebSocket closed: ${code}${reason ? ` ${reason}` : ""}`, willReconnect ? "" : "err");
    if (!willReconnect) {
      sig = null; // connect again by hand
      dropIncoming();
      if ($("status").dataset.state !== "replaced") {
        setStatus("idle", `Disconnected (${code}${reason ? `: ${reason}` : ""})`);
      }
    }
    updateButtons();
  }));
  s.on("session-replaced", mine(() => {
    setStatus("replaced", "Session replaced: this user ID connected somewhere else");
    log("session replaced by another connection of the same key", "err");
  }));
  s.on("error", mine((err) => {
    const about = err.request ? ` (${err.request.type} to ${err.request.to})` : "";
    log(`error ${err.code}${about}: ${err.message}`, "err");
    if (err.code === "peer-offline" && call && !call.connected &&
        (err.request?.to === call.peer || err.peer === call.peer)) {
      endCall(`${call.peer} is not online`, "failed");
    }
  }));
  s.on("ice-servers", mine((msg) => { // unsolicited: right after registering, with TURN
    if (msg.requestId == null) log(`ice-servers: ${msg.iceServers.length} server(s)`);
  }));
  s.on("presence", mine(({ userId, online }) => {
    if (userId === watchedPeer) showPresence(online);
  }));
  s.on("held", mine(({ to, expiresIn }) => {
    if (call?.peer !== to) return;
    setCallStatus("connecting", `${to} is offline: the call waits up to ${expiresIn} s for them to open Volli`);
    log(`${to} is offline: the offer is held for ${expiresIn} s`);
  }));
  s.on("delivered", mine(({ to }) => log(`${to} came online and got the call`)));
  s.on("expired", mine(({ to }) => {
    if (call?.peer === to && !call.connected) endCall(`${to} did not come online in time`, "failed");
  }));
  s.on("sent", mine(({ type, to, sealed }) => {
    if (call?.peer === to) noteSealing(call, "out", type, sealed);
  }));
  s.on("sealed-error", mine(({ reason, from, to, type, message }) => {
    log(`sealed ${type} ${from ? `from ${from}` : `to ${to}`} refused (${reason}): ${message}`, "err");
    if (call && (call.peer === from || call.peer === to)) {
      call.sealingProblem = `${reason} (${type})`;
      showSealing(call);
    }
  }));
  s.on("key-mismatch", mine(({ userId, reason, message }) => {
    log(`key of ${userId} refused (${reason}): ${message}`, "err");
    if (call?.peer === userId) {
      call.sealingProblem = reason;
      showSealing(call);
    }
  }));
  s.on("offer", mine(onOffer));
  s.on("answer", mine(onAnswer));
  s.on("ice-candidate", mine(onCandidate));
}

// ---- Web Push: calls while this page is closed --------------------------------------------

/** The demo's service worker (it shows incoming calls pushed by the server). */
const worker = "serviceWorker" in navigator
  ? navigator.serviceWorker.register("/demo-sw.js").catch((err) => {
    log(`service worker not registered: ${err.message}`, "err");
    return null;
  })
  : Promise.resolve(null);

async function enablePush() {
  const s = sig;
  try {
    const registration = await worker;
    if (!registration) throw new Error("no service worker");
    if (Notification.permission !== "granted" &&
        await Notification.requestPermission() !== "granted") {
      throw new Error("notifications are not allowed");
    }
    await s.subscribePush(registration);
    $("push-note").textContent = "On: a call while this page is closed shows a notification";
    log("Web Push on: the server will wake this browser for calls");
  } catch (err) {
    $("push-note").textContent = `Web Push unavailable: ${err.code ?? ""} ${err.message}`;
    log(`Web Push failed: ${err.code ?? ""} ${err.message}`, "err");
  }
}

// ---- the contact's presence -------------------------------------------------------------

function showPresence(online) {
  const el = $("peer-presence");
  el.dataset.state = online === null ? "unknown" : online ? "online" : "offline";
  el.textContent = online === null ? "–" : online ? "online" : "offline";
}

/** Watch the ID typed in "Their user ID" (unwatching the previous one): the server pushes
 * each change, so the page never polls. */
async function watchPeer() {
  const s = sig;
  const peer = $("peer-id").value.trim();
  if (!s || s.state !== "registered" || peer === watchedPeer) return;
  const previous = watchedPeer;
  watchedPeer = peer || null;
  showPresence(null);
  try {
    if (previous) await s.unwatch([previous]);
    if (!peer) return;
    const [state] = await s.watch([peer]);
    if (s === sig && watchedPeer === peer) showPresence(state.online);
  } catch (err) {
    log(`watch failed: ${err.code}: ${err.message}`, "err");
  }
}

// ---- the call ---------------------------------------------------------------------------

function newCall(peer, initiator) {
  endCall();
  if (incoming?.peer === peer) dropIncoming(); // calling them back answers nothing stale
  const pc = new RTCPeerConnection({ iceServers: sig?.iceServers ?? [] });
  const c = {
    peer, pc, dc: null, initiator,
    // Perfect negotiation needs exactly one polite side: the one with the larger user ID.
    polite: sig.userId > peer,
    makingOffer: false, ignoreOffer: false, queued: [], connected: false, ended: false,
    // Relays of this call, sealed or in clear, each way; a refused key or sealed message.
    sealing: { in: { sealed: 0, clear: 0 }, out: { sealed: 0, clear: 0 } }, sealingProblem: null,
  };
  call = c;
  pc.onicecandidate = ({ candidate }) => {
    if (call === c && sig) relay(() => sig.sendCandidate(peer, candidate));
  };
  pc.onnegotiationneeded = async () => {
    try {
      c.makingOffer = true;
      await pc.setLocalDescription();
      if (call === c && sig) {
        // A first offer of ours waits on the server for a callee who is offline.
        const hold = c.initiator && !c.connected ? { hold: HOLD_SECONDS } : {};
        relay(() => sig.sendOffer(peer, pc.localDescription, hold));
        log(`→ offer to ${peer}`);
      }
    } catch (err) {
      log(`negotiation failed: ${err}`, "err");
    } finally {
      c.makingOffer = false;
    }
  };
  pc.onsignalingstatechange = pc.oniceconnectionstatechange = pc.onconnectionstatechange =
    () => refresh(c);
  pc.ontrack = ({ track, streams }) => {
    if (call === c) $("remote-video").srcObject = streams[0] ?? new MediaStream([track]);
  };
  pc.ondatachannel = ({ channel }) => attachChannel(c, channel);
  if (localStream) for (const track of localStream.getTracks()) pc.addTrack(track, localStream);
  if (initiator) attachChannel(c, pc.createDataChannel("chat"));
  $("peer-id").value = peer;
  watchPeer();
  $("peer-name").textContent = peer;
  refresh(c);
  updateButtons();
  return c;
}

/** Count one relay of call `c` (`way` "in" or "out") and show whether signaling is sealed. */
function noteSealing(c, way, type, sealed) {
  c.sealing[way][sealed ? "sealed" : "clear"] += 1;
  if (!sealed && c.sealing[way].clear === 1) {
    log(`${type} ${way === "in" ? "from" : "to"} ${c.peer} went in clear: the server can read it`, "err");
  }
  showSealing(c);
}

function showSealing(c) {
  if (call !== c) return;
  const el = $("sealing");
  const { in: got, out: sent } = c.sealing;
  const clear = got.clear + sent.clear, sealed = got.sealed + sent.sealed;
  let state, text;
  if (c.sealingProblem) {
    state = "problem";
    text = `Not sealed: ${c.sealingProblem}`;
  } else if (clear) {
    state = "clear";
    text = !sig?.keyPair
      ? "Not sealed: you registered unsigned (the server can read the SDP and candidates)"
      : `Not sealed: ${c.peer} has no verified encryption key (unsigned or an older client); ` +
        "the server can read the SDP and candidates";
  } else if (sealed) {
    state = "sealed";
    text = `Sealed end to end (${sent.sealed} sent, ${got.sealed} received): ` +
      "the server cannot read the offer, answer or candidates";
  } else {
    state = "none";
    text = "–";
  }
  el.dataset.state = state;
  el.textContent = text;
}

function attachChannel(c, dc) {
  c.dc = dc;
  dc.onopen = () => refresh(c);
  dc.onmessage = ({ data }) => { if (call === c) addMessage("peer", c.peer, String(data)); };
  dc.onclose = () => {
    if (call === c && c.connected) endCall(`${c.peer} hung up`);
    else refresh(c);
  };
}

function refresh(c) {
  if (call !== c) return;
  const { pc, dc } = c;
  $("signaling-state").textContent = pc.signalingState;
  $("ice-state").textContent = pc.iceConnectionState;
  $("peer-state").textContent = pc.connectionState;
  $("channel-state").textContent = dc ? `"${dc.label}" ${dc.readyState}` : "–";
  if (pc.connectionState === "connected" && dc?.readyState === "open") {
    if (!c.connected) {
      c.connected = true;
      setCallStatus("connected", "Connected (peer-to-peer)");
      addMessage("system", "", `Connected to ${c.peer}. Messages go directly between your browsers.`);
      log(`peer-to-peer connection to ${c.peer} is up`);
      showRoute(c);
    }
  } else if (pc.connectionState === "failed") {
    setCallStatus("failed", "Connection failed (no network path between the peers)");
  } else if (pc.connectionState === "disconnected") {
    setCallStatus("connecting", "Connection interrupted, waiting…");
  } else if (!c.connected) {
    setCallStatus("connecting", c.initiator ? `Calling ${c.peer}…` : `Call from ${c.peer}: connecting…`);
  }
  updateButtons();
}

async function showRoute(c) {
  try {
    const stats = await c.pc.getStats();
    let pair;
    stats.forEach((r) => {
      if (r.type === "transport" && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
    });
    if (!pair) return;
    const local = stats.get(pair.localCandidateId);
    const remote = stats.get(pair.remoteCandidateId);
    // A peer-reflexive (prflx) remote was learnt from a connectivity check that beat the
    // trickled candidate; Chromium hides its address.
    const show = (x) => `${x.candidateType} ${x.address || x.ip || "(hidden)"}:${x.port}/${x.protocol}`;
    $("route").textContent = `${show(local)} ⇄ ${show(remote)}`;
    if (call === c && [local.candidateType, remote.candidateType].includes("relay")) {
      setCallStatus("connected", "Connected (through a TURN relay)");
    }
  } catch (err) {
    log(`getStats failed: ${err}`, "err");
  }
}

function endCall(reason = "", state = "ended") {
  const c = call;
  if (!c) return;
  call = null;
  c.ended = true;
  try { c.dc?.close(); } catch { /* closed */ }
  c.pc.close();
  $("remote-video").srcObject = null;
  for (const id of ["peer-name", "signaling-state", "ice-state", "peer-state", "channel-state", "route", "sealing"]) {
    $(id).textContent = "–";
  }
  $("sealing").dataset.state = "none";
  if (reason) {
    setCallStatus(state, reason);
    addMessage("system", "", reason);
    log(reason);
  }
  updateButtons();
}

function startCall(event) {
  event.preventDefault();
  const peer = $("peer-id").value.trim();
  if (!peer || sig?.state !== "registered") return;
  if (peer === sig.userId) {
    setCallStatus("failed", "Enter the other person's user ID, not yours");
    return;
  }
  log(`calling ${peer}`);
  newCall(peer, true);
}

// Anyone who knows your ID can send an offer: ask before answering a new caller.
function askToAnswer(msg) {
  if (incoming?.peer !== msg.from) {
    const waited = msg.heldFor ? ` (it waited ${(msg.heldFor / 1000).toFixed(1)} s for you to come online)` : "";
    log(`incoming call from ${msg.from}${waited}: waiting for you`);
  }
  incoming = { peer: msg.from, offer: msg, queued: [] }; // a repeated offer replaces the last
  $("incoming-from").textContent = msg.from;
  $("incoming-sealed").textContent = msg.sealed ? "sealed end to end" : "not sealed";
  $("incoming-sealed").dataset.state = msg.sealed ? "sealed" : "clear";
  $("incoming").hidden = false;
}

function dropIncoming() {
  incoming = null;
  $("incoming").hidden = true;
}

async function acceptCall() {
  const inc = incoming;
  dropIncoming();
  if (!inc || sig?.state !== "registered") return;
  log(`accepted the call from ${inc.peer}`);
  newCall(inc.peer, false).queued.push(...inc.queued);
  await onOffer(inc.offer);
}

function declineCall() {
  // Nothing is sent: the caller learns nothing, and no state of the offer is kept.
  if (incoming) log(`declined the call from ${incoming.peer}`);
  dropIncoming();
}

async function onOffer(msg) {
  const c = call;
  if (!c || c.peer !== msg.from) {
    askToAnswer(msg);
    return;
  }
  log(`← offer from ${msg.from}${msg.sealed ? " (sealed)" : ""}`);
  noteSealing(c, "in", "offer", msg.sealed);
  const collision = c.makingOffer || c.pc.signalingState !== "stable";
  c.ignoreOffer = !c.polite && collision;
  if (c.ignoreOffer) {
    log("ignored a colliding offer (we are the impolite side)");
    return;
  }
  try {
    await c.pc.setRemoteDescription(msg.offer); // rolls back our own offer if we are polite
    await flushCandidates(c);
    await c.pc.setLocalDescription();
    if (call === c && sig) {
      relay(() => sig.sendAnswer(c.peer, c.pc.localDescription));
      log(`→ answer to ${c.peer}`);
    }
  } catch (err) {
    log(`could not answer: ${err}`, "err");
  }
}

async function onAnswer(msg) {
  const c = call;
  if (!c || c.peer !== msg.from) return;
  log(`← answer from ${msg.from}${msg.sealed ? " (sealed)" : ""}`);
  noteSealing(c, "in", "answer", msg.sealed);
  try {
    await c.pc.setRemoteDescription(msg.answer);
    await flushCandidates(c);
  } catch (err) {
    log(`bad answer: ${err}`, "err");
  }
}

async function onCandidate(msg) {
  if (incoming?.peer === msg.from) { // kept until the user decides (bounded)
    if (msg.candidate != null && incoming.queued.length < 100) incoming.queued.push(msg.candidate);
    return;
  }
  const c = call;
  if (!c || c.peer !== msg.from) return;
  noteSealing(c, "in", "ice-candidate", msg.sealed);
  if (msg.candidate == null) return; // null: end of candidates
  if (!c.pc.remoteDescription) {
    c.queued.push(msg.candidate); // arrived before the offer/answer was applied
    return;
  }
  await addCandidate(c, msg.candidate);
}

async function flushCandidates(c) {
  for (const candidate of c.queued.splice(0)) await addCandidate(c, candidate);
}

async function addCandidate(c, candidate) {
  try {
    await c.pc.addIceCandidate(candidate);
  } catch (err) {
    if (!c.ignoreOffer) log(`bad ICE candidate: ${err}`, "err");
  }
}

// ---- chat and camera --------------------------------------------------------------------

function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || !call?.dc || call.dc.readyState !== "open") return;
  call.dc.send(text);
  addMessage("me", "You", text);
  input.value = "";
  input.focus();
}

async function toggleCamera() {
  if (localStream) {
    for (const track of localStream.getTracks()) track.stop();
    if (call) {
      for (const sender of call.pc.getSenders()) if (sender.track) call.pc.removeTrack(sender);
    }
    localStream = null;
    $("local-video").srcObject = null;
    $("camera").textContent = "Start camera";
    return;
  }
  if (!navigator.mediaDevices?.getUserMedia) {
    $("camera-note").textContent = "No camera access here (needs https or localhost).";
    return;
  }
  try {
    localStream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (err) {
    $("camera-note").textContent = `No camera: ${err.name}`;
    return;
  }
  $("camera-note").textContent = "";
  $("camera").textContent = "Stop camera";
  $("local-video").srcObject = localStream;
  if (call) for (const track of localStream.getTracks()) call.pc.addTrack(track, localStream);
}

// ---- start ------------------------------------------------------------------------------

const params = new URLSearchParams(location.search);
$("user-id").value = params.get("user") || randomId();
if (params.get("peer")) $("peer-id").value = params.get("peer");
$("connect-form").addEventListener("submit", connect);
$("disconnect").addEventListener("click", disconnect);
$("call-form").addEventListener("submit", startCall);
$("push").addEventListener("click", enablePush);
let typing = null;
$("peer-id").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(watchPeer, 500); // once the user stops typing
});
$("hangup").addEventListener("click", () => endCall("You hung up"));
$("accept").addEventListener("click", acceptCall);
$("decline").addEventListener("click", declineCall);
$("chat-form").addEventListener("submit", sendChat);
$("camera").addEventListener("click", toggleCamera);
window.addEventListener("pagehide", () => sig?.close());
checkSigning();
updateButtons();
// For debugging from the console.
window.volliDemo = { get signaling() { return sig; }, get call() { return call; } };
