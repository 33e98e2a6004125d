"""Settings: one table of every setting, loaded once from the environment and validated.

Pure standard library (redis_connect parses URLs without redis-py): gunicorn.conf.py imports this in the master process
(before gevent patches anything) to size the worker and refuse bad settings
before any worker boots. ``create_app`` loads the same table.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from typing import Any, Callable, Mapping

from . import redis_connect


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists every problem."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _parse_number(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None
    return parse


_int, _float = _parse_number(int), _parse_number(float)


def _parse_redis_url(text: str) -> str:
    redis_connect.parse(text)  # raises ValueError saying what is wrong
    return text


def _proxies(text: str):
    text = text.strip()
    if not text:
        return 0
    if text.isdigit():
        return int(text)
    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in text.split(",") if part.strip())


def _parse_trusted_proxies(text: str) -> str:
    try:
        _proxies(text)
    except ValueError:
        raise ValueError("expected a hop count or comma-separated CIDRs") from None
    return text


def _parse_log_format(text: str) -> str:
    if text.lower() not in {"text", "json"}:
        raise ValueError("expected text or json")
    return text.lower()


def _parse_log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return level


def _parse_turn_for(text: str) -> str:
    if text.lower() not in {"signed", "all"}:
        raise ValueError("expected signed or all")
    return text.lower()


def _setting(env: str, default: Any, parse: Callable[[str], Any], doc: str,
             minimum: float | None = None) -> Any:
    return dataclasses.field(default=default, metadata={
        "env": env, "parse": parse, "minimum": minimum, "doc": doc})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, its environment variable, default and meaning.

    The single source of truth: README's table and config/volli.env.example are
    checked against it by tests/test_config.py.
    """

    host: str = _setting("HOST", "0.0.0.0", str, "Address to listen on.")
    port: int = _setting("PORT", 8080, _int, "TCP port to listen on.", 1)
    health_port: int = _setting(
        "VOLLI_HEALTH_PORT", 0, _int,
        "A second TCP port, on HOST, that serves only /health, /ready and /metrics, so "
        "that probes are not queued behind a reconnect storm's connections; 0 = none.", 0)
    workers: int = _setting(
        "WEB_CONCURRENCY", 1, _int,
        "gunicorn worker processes. Must be 1 with the in-memory backend.", 1)
    max_message_size: int = _setting(
        "VOLLI_MAX_MESSAGE_SIZE", 65536, _int,
        "Largest accepted message in characters (bytes for binary); bigger closes with 1009.", 256)
    max_connections: int = _setting(
        "VOLLI_MAX_CONNECTIONS", 10000, _int,
        "Open WebSockets per worker; beyond it the upgrade is refused with HTTP 503.", 1)
    ping_interval: float = _setting(
        "VOLLI_PING_INTERVAL", 25.0, _float,
        "Seconds between server pings; a peer that misses a pong is closed with 1008.", 0.1)
    register_timeout: float = _setting(
        "VOLLI_REGISTER_TIMEOUT", 30.0, _float,
        "Seconds a connection may stay unregistered before it is closed with 4001.", 0.1)
    send_queue_limit: int = _setting(
        "VOLLI_SEND_QUEUE_LIMIT", 1048576, _int,
        "Bytes of frames queued for one connection: relays are refused (peer-busy) past "
        "it (past an eighth while the peer's window is full); replies past it close the "
        "connection (4002).",
        1024)
    send_timeout: float = _setting(
        "VOLLI_SEND_TIMEOUT", 10.0, _float,
        "Seconds one frame may take to leave for a receiver before the receiver is dropped.", 0.1)
    permessage_deflate: bool = _setting(
        "VOLLI_PERMESSAGE_DEFLATE", False, _parse_bool,
        "Accept permessage-deflate compression (about 100 kB more memory per connection).")
    stats_interval: float = _setting(
        "VOLLI_STATS_INTERVAL", 60.0, _float,
        "Seconds between the per-worker stats log lines.", 0.1)
    log_level: str = _setting(
        "VOLLI_LOG_LEVEL", "INFO", _parse_log_level, "Level of the volli logger.")
    redis_url: str = _setting(
        "VOLLI_REDIS_URL", "", _parse_redis_url,
        "Redis for shared presence and routing: one server (redis://, rediss:// or "
        "unix://), a Cluster (redis+cluster://host:port[,host:port…]) or Sentinel "
        "(redis+sentinel://host:port[,host:port…]/service[/db]); rediss+ for TLS. "
        "Empty keeps presence in memory.")
    redis_prefix: str = _setting(
        "VOLLI_REDIS_PREFIX", "volli:", str,
        "Prefix of every Redis key and channel (several deployments can share one Redis).")
    presence_ttl: float = _setting(
        "VOLLI_PRESENCE_TTL", 15.0, _float,
        "Seconds a worker's users stay online in Redis without its heartbeat (every TTL/4); "
        "the same on every server sharing the Redis prefix (a server with another value "
        "does not start).",
        1.0)
    redis_pool_size: int = _setting(
        "VOLLI_REDIS_POOL_SIZE", 64, _int,
        "Redis connections per worker; greenlets wait for a free one.", 1)

    require_signature: bool = _setting(
        "VOLLI_REQUIRE_SIGNATURE", False, _parse_bool,
        "Refuse unsigned registrations (signature-required); off keeps seed clients working.")
    require_sealed: bool = _setting(
        "VOLLI_REQUIRE_SEALED", False, _parse_bool,
        "Refuse plaintext offer, answer and ice-candidate relays (sealed-required): the "
        "server then never sees SDP or candidates.")
    rate_messages: float = _setting(
        "VOLLI_RATE_MESSAGES", 50.0, _float,
        "Messages per second one connection may send, sustained (token bucket).", 0.1)
    rate_burst: int = _setting(
        "VOLLI_RATE_BURST", 200, _int, "Messages one connection may send in a burst.", 1)
    rate_frames: float = _setting(
        "VOLLI_RATE_FRAMES", 500.0, _float,
        "WebSocket frames of any kind (messages, continuations, pings, pongs) one connection "
        "may send per second, bursts of four times that; beyond it the connection is closed "
        "with 4029.", 100)
    rate_abuse_close: int = _setting(
        "VOLLI_RATE_ABUSE_CLOSE", 100, _int,
        "rate-limited errors within a minute after which the connection is closed (4029).", 1)
    fanout_per_minute: int = _setting(
        "VOLLI_FANOUT_PER_MINUTE", 60, _int,
        "Distinct relay targets one connection may address per minute.", 1)
    discover_per_minute: int = _setting(
        "VOLLI_DISCOVER_PER_MINUTE", 120, _int,
        "discover requests one connection may make per minute (bucket of that size).", 1)
    watch_max: int = _setting(
        "VOLLI_WATCH_MAX", 256, _int,
        "User IDs one connection may watch at once (watch beyond it: rate-limited, "
        "limit watched-ids).", 1)
    watch_per_minute: int = _setting(
        "VOLLI_WATCH_PER_MINUTE", 30, _int,
        "watch requests one connection may make per minute (bucket of that size).", 1)
    presence_debounce: float = _setting(
        "VOLLI_PRESENCE_DEBOUNCE", 3.0, _float,
        "Seconds a user must stay offline before its watchers are told; one who registers "
        "again sooner is never announced offline.", 0)
    hold_max: int = _setting(
        "VOLLI_HOLD_MAX", 60, _int,
        "Most seconds an offer with hold waits for an offline callee (a longer hold is "
        "cut to it); 0 disables holding (such offers get peer-offline).", 0)
    hold_per_caller: int = _setting(
        "VOLLI_HOLD_PER_CALLER", 4, _int,
        "Offers one connection may hold at once (rate-limited, limit held-offers).", 1)
    hold_per_callee: int = _setting(
        "VOLLI_HOLD_PER_CALLEE", 8, _int,
        "Callers whose offers may be held for one callee at once (rate-limited, limit "
        "held-for-peer).", 1)
    hold_candidates: int = _setting(
        "VOLLI_HOLD_CANDIDATES", 32, _int,
        "ICE candidates held with one offer (rate-limited, limit held-candidates).", 0)
    hold_bytes: int = _setting(
        "VOLLI_HOLD_BYTES", 262144, _int,
        "Bytes of held offers and candidates one connection may have at once "
        "(rate-limited, limit held-bytes).", 1024)
    vapid_private_key: str = _setting(
        "VOLLI_VAPID_PRIVATE_KEY", "", str,
        "VAPID private key (base64url P-256, from python -m volli.push generate-keys) that "
        "signs Web Push wake-ups; empty turns Web Push off (push-disabled).")
    vapid_subject: str = _setting(
        "VOLLI_VAPID_SUBJECT", "mailto:admin@localhost", str,
        "The VAPID sub claim: a mailto: or https: contact for push services.")
    push_services: str = _setting(
        "VOLLI_PUSH_SERVICES",
        "https://fcm.googleapis.com,https://updates.push.services.mozilla.com,"
        "https://web.push.apple.com,https://*.notify.windows.com", str,
        "Comma-separated origins push subscriptions may point at (a *. host matches its "
        "subdomains); the server sends requests there only.")
    push_max_per_user: int = _setting(
        "VOLLI_PUSH_MAX_PER_USER", 5, _int,
        "Push subscriptions kept per user ID (the oldest goes beyond it).", 1)
    push_concurrency: int = _setting(
        "VOLLI_PUSH_CONCURRENCY", 20, _int,
        "Pushes in flight per worker; beyond it a push is dropped and counted (overflow).",
        1)
    push_timeout: float = _setting(
        "VOLLI_PUSH_TIMEOUT", 5.0, _float, "Seconds one push may take.", 0.1)
    ip_max_connections: int = _setting(
        "VOLLI_IP_MAX_CONNECTIONS", 100, _int,
        "Open WebSockets per client IP and worker (HTTP 429 beyond); 0 = no limit.", 0)
    ip_connect_rate: float = _setting(
        "VOLLI_IP_CONNECT_RATE", 20.0, _float,
        "WebSocket upgrades per second per client IP and worker, burst twice that "
        "(HTTP 429 beyond); 0 = no limit.", 0)
    ip_v6_prefix: int = _setting(
        "VOLLI_IP_V6_PREFIX", 64, _int,
        "IPv6 clients count as one address per prefix of this length for the per-IP "
        "limits (an ordinary subscriber holds a whole /64); IPv4 clients per address.", 1)
    trusted_proxies: str = _setting(
        "VOLLI_TRUSTED_PROXIES", "", _parse_trusted_proxies,
        "Trust X-Forwarded-For from this many proxy hops, or from these comma-separated "
        "CIDRs; empty trusts nobody (the socket address is the client IP).")
    allowed_origins: str = _setting(
        "VOLLI_ALLOWED_ORIGINS", "", str,
        "Comma-separated Origins allowed to open WebSockets (HTTP 403 otherwise); empty "
        "allows every Origin.")
    binding_retention: float = _setting(
        "VOLLI_BINDING_RETENTION", 7776000.0, _float,
        "Seconds a signed user ID stays bound to its key after its last registration or "
        "disconnect (a TTL in Redis); then anyone may register it again.", 1)
    max_bindings: int = _setting(
        "VOLLI_MAX_BINDINGS", 100000, _int,
        "Signed user IDs bound at once (per worker in memory, per deployment in Redis); "
        "beyond it new ones are refused with bindings-full until bindings expire.", 1)
    admin_token: str = _setting(
        "VOLLI_ADMIN_TOKEN", "", str,
        "Enables the operator's /admin endpoints (unbind) for requests with "
        "Authorization: Bearer <token>; empty disables them (404).")
    tls_certfile: str = _setting(
        "VOLLI_TLS_CERTFILE", "", str, "PEM certificate: gunicorn then serves https/wss itself.")
    tls_keyfile: str = _setting(
        "VOLLI_TLS_KEYFILE", "", str, "PEM private key for VOLLI_TLS_CERTFILE.")

    log_format: str = _setting(
        "VOLLI_LOG_FORMAT", "text", _parse_log_format,
        "text, or json for one JSON object per log line (volli's and gunicorn's).")
    metrics_token: str = _setting(
        "VOLLI_METRICS_TOKEN", "", str,
        "If set, /metrics requires the header Authorization: Bearer <token>.")
    turn_secret: str = _setting(
        "VOLLI_TURN_SECRET", "", str,
        "Shared secret of a TURN server using coturn's use-auth-secret; enables ice-servers.")
    turn_uris: str = _setting(
        "VOLLI_TURN_URIS", "", str,
        "Comma-separated TURN/STUN URIs handed out, e.g. turn:turn.example.com:3478.")
    turn_ttl: int = _setting(
        "VOLLI_TURN_TTL", 3600, _int, "Seconds a TURN credential stays valid.", 60)
    turn_for: str = _setting(
        "VOLLI_TURN_FOR", "signed", _parse_turn_for,
        "Who gets TURN credentials: signed (sessions registered with a signature) or all.")
    turn_per_minute: int = _setting(
        "VOLLI_TURN_PER_MINUTE", 6, _int,
        "TURN credentials one connection may be issued per minute (the one sent on "
        "register counts).", 1)

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/").lower()
                         for o in self.allowed_origins.split(",") if o.strip())

    @property
    def proxies(self) -> int | tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """Trusted proxy hops (an int), or trusted proxy networks."""
        return _proxies(self.trusted_proxies)

    @property
    def redis_topology(self) -> redis_connect.Topology | None:
        """The parsed VOLLI_REDIS_URL (None without one)."""
        return redis_connect.parse(self.redis_url) if self.redis_url else None

    @property
    def backend(self) -> str:
        return "redis" if self.redis_url else "memory"


SETTINGS = dataclasses.fields(Settings)


def check_workers(settings: Settings, workers: int) -> str | None:
    """The problem with running this many workers, or None."""
    if workers > 1 and settings.backend == "memory":
        return (f"{workers} workers: the in-memory backend keeps presence inside one process, "
                "so users on different workers could not reach each other; run one worker "
                "(WEB_CONCURRENCY=1) or set VOLLI_REDIS_URL")
    return None


def load(environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build Settings from environment variables, then apply typed overrides.

    Raises ConfigError naming every invalid variable at once.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    overrides = dict(overrides or {})
    for field in SETTINGS:
        env, minimum = field.metadata["env"], field.metadata["minimum"]
        if field.name in overrides:
            value = overrides.pop(field.name)
            source = field.name
        elif environ.get(env, "").strip():
            source = env
            try:
                value = field.metadata["parse"](environ[env].strip())
            except ValueError as exc:
                problems.append(f"{env}={environ[env]!r}: {exc}")
                continue
        else:
            continue
        if minimum is not None and value < minimum:
            problems.append(f"{source}={value!r}: must be at least {minimum}")
            continue
        values[field.name] = value
    if overrides:
        problems.append(f"unknown settings: {', '.join(sorted(overrides))}")
    settings = Settings(**values)
    if settings.send_queue_limit < settings.max_message_size:
        problems.append("VOLLI_SEND_QUEUE_LIMIT must be at least VOLLI_MAX_MESSAGE_SIZE")
    if settings.ip_v6_prefix > 128:
        problems.append(f"VOLLI_IP_V6_PREFIX={settings.ip_v6_prefix}: must be at most 128")
    if settings.backend == "redis" and settings.binding_retention < settings.presence_ttl:
        problems.append("VOLLI_BINDING_RETENTION must be at least VOLLI_PRESENCE_TTL (the "
                        "heartbeat, every TTL/4, renews online users' bindings)")
    if settings.health_port > 65535 or settings.port > 65535:
        problems.append("PORT and VOLLI_HEALTH_PORT must be at most 65535")
    elif settings.health_port == settings.port:
        problems.append("VOLLI_HEALTH_PORT must differ from PORT")
    workers_problem = check_workers(settings, settings.workers)
    if workers_problem:
        problems.append(f"WEB_CONCURRENCY={settings.workers}: {workers_problem}")
    if bool(settings.turn_secret) != bool(settings.turn_uris):
        problems.append("VOLLI_TURN_SECRET and VOLLI_TURN_URIS must be set together")
    if bool(settings.tls_certfile) != bool(settings.tls_keyfile):
        problems.append("VOLLI_TLS_CERTFILE and VOLLI_TLS_KEYFILE must be set together")
    for path in (settings.tls_certfile, settings.tls_keyfile):
        if path and not os.path.isfile(path):
            problems.append(f"TLS file {path!r} does not exist")
    if settings.vapid_private_key:
        from .push import key_problem

        problem = key_problem(settings.vapid_private_key)
        if problem:
            problems.append(f"VOLLI_VAPID_PRIVATE_KEY: {problem}")
    if problems:
        raise ConfigError("invalid Volli configuration:\n  " + "\n  ".join(problems))
    return settings
