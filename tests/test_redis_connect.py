"""VOLLI_REDIS_URL parsing (volli/redis_connect.py) and its use in the settings; the
clients against real deployments are in tests/test_redis_topologies.py."""

import subprocess
import sys

import pytest

from volli import config
from volli.redis_connect import CLUSTER, SENTINEL, SINGLE, parse


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "rediss://user:secret@host:6380/2?ssl_cert_reqs=none",
    "unix:///run/redis.sock?db=1", "redis://", "redis://h?anything=goes",
])
def test_single_server_urls_are_taken_as_before(url):
    topology = parse(url)
    assert (topology.kind, topology.url, topology.nodes) == (SINGLE, url, ())
    assert not topology.sharded_pubsub


def test_cluster_url():
    topology = parse("redis+cluster://bob:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002/"
                     "?protocol=3&client_name=volli")
    assert topology.kind == CLUSTER and topology.sharded_pubsub and not topology.tls
    assert topology.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (topology.username, topology.password) == ("bob", "p@ss")
    assert dict(topology.options) == {"protocol": 3, "client_name": "volli"}
    tls = parse("rediss+cluster://h:7000?ssl_cert_reqs=none&ssl_check_hostname=no")
    assert tls.tls and dict(tls.options) == {"ssl_cert_reqs": "none",
                                             "ssl_check_hostname": False}


def test_sentinel_url():
    topology = parse("redis+sentinel://:pw@s1:26380,s2/volli/3?sentinel_password=sp")
    assert topology.kind == SENTINEL and not topology.sharded_pubsub
    assert topology.nodes == (("s1", 26380), ("s2", 26379))
    assert (topology.service, topology.db) == ("volli", 3)
    assert (topology.username, topology.password) == (None, "pw")
    assert dict(topology.options) == {"sentinel_password": "sp"}
    assert parse("rediss+sentinel://s1/primary").tls
    assert parse("redis+sentinel://s1:26379/volli/").db == 0


def test_passwords_stay_out_of_logs():
    topology = parse("redis+sentinel://u:pw@s1/volli?sentinel_password=sp")
    assert "pw" not in repr(topology) and "sp" not in repr(topology)
    assert topology.redacted == "redis+sentinel://u:***@s1/volli?sentinel_password=***"
    assert parse("redis://:pw@h:1/0").redacted == "redis://:***@h:1/0"
    assert parse("redis+cluster://h:1").redacted == "redis+cluster://h:1"


@pytest.mark.parametrize("url, message", [
    ("http://h:1", "expected a redis://"),
    ("redis+cluster//h:1", "expected a redis://"),
    ("redis+sentinels://h/volli", "expected a redis://"),
    ("redis+cluster://", "expected host:port"),
    ("redis+cluster://a:1,,b:2", "expected host:port"),
    ("redis+cluster://:7000", "no host"),
    ("redis+cluster://h:0", "bad port"),
    ("redis+cluster://h:70000", "bad port"),
    ("redis+cluster://h:port", "bad port"),
    ("redis+cluster://[::1:7000", "bad IPv6"),
    ("redis+cluster://h:1/2", "cluster has only database 0"),
    ("redis+cluster://h:1#frag", "no #fragment"),
    ("redis+cluster://h:1?socket_timeout=1", "Volli sets timeouts"),
    ("redis+cluster://h:1?ssl_cert_reqs=none", "TLS options need the rediss+ scheme"),
    ("redis+cluster://h:1?sentinel_password=x", "unknown option 'sentinel_password'"),
    ("redis+cluster://h:1?protocol=4", "option protocol='4': expected 2 or 3"),
    ("rediss+cluster://h:1?ssl_cert_reqs=maybe", "expected none, optional or required"),
    ("redis+sentinel://s1:26379", "needs the monitored service's name"),
    ("redis+sentinel://s1:26379/", "needs the monitored service's name"),
    ("redis+sentinel://s1/volli/x", "expected /service or /service/db"),
    ("redis+sentinel://s1/volli/1/2", "expected /service or /service/db"),
])
def test_bad_urls_say_what_is_wrong(url, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")
                       .replace("[", r"\[").replace("+", r"\+")):
        parse(url)


def test_settings_validate_the_url_and_keep_the_string():
    url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
    settings = config.load({"VOLLI_REDIS_URL": url})
    assert settings.redis_url == url and settings.backend == "redis"
    assert settings.redis_topology.nodes == (("127.0.0.1", 7000), ("127.0.0.1", 7001))
    assert config.load({}).redis_topology is None
    with pytest.raises(config.ConfigError, match="VOLLI_REDIS_URL=.*service's name"):
        config.load({"VOLLI_REDIS_URL": "redis+sentinel://127.0.0.1:26379"})


def test_parsing_does_not_import_redis_py():
    # gunicorn's master parses the settings before gevent patches ssl, which redis-py imports.
    code = ("import sys; from volli import config; "
            "config.load({'VOLLI_REDIS_URL': 'redis+sentinel://s/volli'}).redis_topology; "
            "assert 'redis' not in sys.modules and 'ssl' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_clients_are_built_as_asked_without_connecting():
    import redis
    from redis.connection import SSLConnection

    from volli.redis_connect import connect

    single = connect(parse("redis://127.0.0.1:1/0"), max_connections=3, pool_timeout=1)
    assert isinstance(single.connection_pool, redis.BlockingConnectionPool)
    assert single.connection_pool.max_connections == 3
    primary = connect(parse("rediss+sentinel://u:pw@127.0.0.1:1/volli/2"
                            "?ssl_cert_reqs=none&sentinel_password=sp"),
                      max_connections=3, pool_timeout=1, socket_timeout=None)
    pool = primary.connection_pool
    assert isinstance(pool, redis.BlockingConnectionPool) and pool.service_name == "volli"
    assert issubclass(pool.connection_class, SSLConnection)
    assert {k: pool.connection_kwargs[k] for k in ("username", "password", "db")} == {
        "username": "u", "password": "pw", "db": 2}
    sentinel = pool.sentinel_manager.sentinels[0].connection_pool
    assert issubclass(sentinel.connection_class, SSLConnection)
    assert sentinel.connection_kwargs["password"] == "sp"
    assert sentinel.connection_kwargs["socket_timeout"] == 2.0  # never None, unlike the data
