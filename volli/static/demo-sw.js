// The demo's service worker: shows an incoming call when Volli's Web Push wake-up
// arrives (docs/protocol.md section 5d) while the page is closed or the phone asleep.
// The push carries who calls and until when, never SDP; opening the page registers, and
// the held offer arrives there.

self.addEventListener("push", (event) => {
  let call = {};
  try {
    call = event.data ? event.data.json() : {};
  } catch {
    return; // not a push of ours
  }
  if (call.type !== "incoming-call") return;
  const until = new Date(call.expiresAt).toLocaleTimeString();
  event.waitUntil(self.registration.showNotification(`${call.from} is calling you`, {
    body: `Open Volli to answer (the call waits until ${until}).`,
    tag: `volli-call-${call.from}`,
    data: call,
    requireInteraction: true,
  }));
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const call = event.notification.data ?? {};
  const url = `/demo?user=${encodeURIComponent(call.to ?? "")}&peer=${encodeURIComponent(call.from ?? "")}`;
  event.waitUntil((async () => {
    const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
    const open = windows.find((w) => new URL(w.url).pathname === "/demo");
    if (open) return open.focus();
    return self.clients.openWindow(url);
  })());
});
