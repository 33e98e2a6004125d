"""The Redis backend, one module per concern (imports redis-py: load it only when used).

    keys       key and channel names (one Redis, or groups with hash tags on a cluster)
    wire       the versioned node-to-node message format (sans-I/O)
    scripts    the Lua scripts and their reply codes
    clients    building the Redis clients (one Redis, Sentinel, Cluster)
    presence   the presence store: claim, rebind, release, unbind, lookup; release batches
    router     relays to other nodes: route script, route cache, outbox; relays arriving
    bus        publishing to nodes and this node's listener
    heartbeat  epochs, alive key, renewal and re-announce of local users
    backend    RedisBackend: the above behind base.Backend
"""

from .backend import RedisBackend
from .heartbeat import TTLMismatch

__all__ = ["RedisBackend", "TTLMismatch"]
