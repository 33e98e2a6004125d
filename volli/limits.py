"""Rate limits as plain arithmetic on timestamps (no clocks, no I/O: callers pass ``now``)."""

from __future__ import annotations

import functools
import ipaddress


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each event takes one."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float, cost: float = 1) -> float:
        """0 if allowed (``cost`` tokens spent), else seconds until they are available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class DistinctInWindow:
    """At most ``limit`` distinct keys in any window of ``window`` seconds."""

    __slots__ = ("limit", "window", "seen")

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self.seen: dict[str, float] = {}  # key -> when it stops counting

    def allow(self, key: str, now: float) -> float:
        """0 if allowed, else seconds until a slot frees."""
        if key in self.seen and self.seen[key] > now:
            self.seen[key] = now + self.window
            return 0.0
        if len(self.seen) >= self.limit:
            self.seen = {k: t for k, t in self.seen.items() if t > now}
            if len(self.seen) >= self.limit:
                return min(self.seen.values()) - now
        self.seen[key] = now + self.window
        return 0.0


class CountInWindow:
    """Counts events in fixed windows of ``window`` seconds."""

    __slots__ = ("window", "start", "count")

    def __init__(self, window: float, now: float) -> None:
        self.window, self.start, self.count = window, now, 0

    def add(self, now: float) -> int:
        if now - self.start >= self.window:
            self.start, self.count = now, 0
        self.count += 1
        return self.count


def per_minute(count: int, now: float) -> TokenBucket:
    """``count`` a minute, all of them at once if saved up."""
    return TokenBucket(count / 60.0, count, now)


class ConnectionLimits:
    """The per-connection limits of docs/protocol.md, built from Settings."""

    __slots__ = ("messages", "discovers", "targets", "violations", "turn", "frames", "watches")

    def __init__(self, settings, now: float) -> None:
        self.messages = TokenBucket(settings.rate_messages, settings.rate_burst, now)
        self.frames = TokenBucket(settings.rate_frames, 4 * settings.rate_frames, now)
        self.discovers = per_minute(settings.discover_per_minute, now)
        self.turn = per_minute(settings.turn_per_minute, now)
        self.watches = per_minute(settings.watch_per_minute, now)
        self.targets = DistinctInWindow(settings.fanout_per_minute, 60.0)
        self.violations = CountInWindow(60.0, now)


@functools.lru_cache(maxsize=4096)  # parsing an address is a few % of a connection's CPU
def address_group(address: str, v6_prefix: int) -> str:
    """What the per-IP limits count by: an IPv4 address (also when IPv4-mapped), or the
    IPv6 network of ``v6_prefix`` bits around it, since one subscriber holds a /64 or
    more; a port some proxies append is dropped. Anything else (a Unix socket peer)
    counts as itself."""
    host = address.strip()
    if host.startswith("["):  # "[v6]:port", as some load balancers write it
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:  # "v4:port"
        host = host.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, v6_prefix), strict=False))


class AddressLimits:
    """Per client address group (``address_group``): open connections and upgrade
    attempts (one process's view)."""

    PURGE_AT = 4096  # idle buckets are dropped once this many addresses are tracked

    def __init__(self, max_connections: int, connect_rate: float, v6_prefix: int = 64) -> None:
        self.max_connections, self.connect_rate = max_connections, connect_rate
        self.v6_prefix = v6_prefix
        self.open: dict[str, int] = {}
        self.attempts: dict[str, TokenBucket] = {}

    def admit(self, address: str, now: float) -> str | None:
        """Count an upgrade attempt; the limit that refuses it ("ip-rate" or
        "ip-connections"), or None (then it is open)."""
        address = address_group(address, self.v6_prefix)
        if self.connect_rate:
            bucket = self.attempts.get(address)
            if bucket is None:
                if len(self.attempts) >= self.PURGE_AT:
                    self.attempts = {a: b for a, b in self.attempts.items() if not b.full(now)}
                bucket = self.attempts[address] = TokenBucket(
                    self.connect_rate, 2 * self.connect_rate, now)
            if bucket.take(now):
                return "ip-rate"
        if self.max_connections and self.open.get(address, 0) >= self.max_connections:
            return "ip-connections"
        self.open[address] = self.open.get(address, 0) + 1
        return None

    def release(self, address: str) -> None:
        address = address_group(address, self.v6_prefix)
        left = self.open.get(address, 0) - 1
        if left > 0:
            self.open[address] = left
        else:
            self.open.pop(address, None)
