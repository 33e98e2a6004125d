"""Settings: environment mapping, validation, and the docs that list them."""

import re

import pytest

from conftest import ROOT
from volli.app import create_app
from volli.transport.handshake import HandshakeOnly
from volli.config import SETTINGS, ConfigError, Settings, load


def test_defaults():
    settings = load({})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.workers) == ("0.0.0.0", 8080, 1)
    assert settings.max_message_size == 65536 and settings.ping_interval == 25.0
    assert settings.permessage_deflate is False


def test_environment_overrides_and_types():
    settings = load({"PORT": "9000", "HOST": "127.0.0.1", "VOLLI_PING_INTERVAL": "2.5",
                     "VOLLI_PERMESSAGE_DEFLATE": "Yes", "VOLLI_LOG_LEVEL": "debug",
                     "VOLLI_MAX_MESSAGE_SIZE": " 1024 ", "UNRELATED": "x"})
    assert (settings.port, settings.host, settings.ping_interval) == (9000, "127.0.0.1", 2.5)
    assert settings.permessage_deflate is True and settings.log_level == "DEBUG"
    assert settings.max_message_size == 1024


@pytest.mark.parametrize("value,expected", [("False", False), ("0", False), ("off", False),
                                            ("TRUE", True), ("1", True)])
def test_booleans_are_parsed_not_truthy_strings(value, expected):
    assert load({"VOLLI_PERMESSAGE_DEFLATE": value}).permessage_deflate is expected


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load({"PORT": "http", "VOLLI_PERMESSAGE_DEFLATE": "maybe", "VOLLI_PING_INTERVAL": "-1",
              "VOLLI_LOG_LEVEL": "loud"})
    text = str(info.value)
    for needle in ("PORT='http': expected an integer", "VOLLI_PERMESSAGE_DEFLATE='maybe'",
                   "VOLLI_PING_INTERVAL=-1.0: must be at least 0.1", "VOLLI_LOG_LEVEL='loud'"):
        assert needle in text


def test_cross_checks():
    with pytest.raises(ConfigError, match="VOLLI_SEND_QUEUE_LIMIT must be at least"):
        load({"VOLLI_MAX_MESSAGE_SIZE": "100000", "VOLLI_SEND_QUEUE_LIMIT": "50000"})
    with pytest.raises(ConfigError, match="in-memory backend"):
        load({"WEB_CONCURRENCY": "4"})


def test_overrides_for_tests_are_typed_and_checked():
    assert load({"PORT": "1"}, {"port": 2}).port == 2
    with pytest.raises(ConfigError, match="unknown settings: colour"):
        load({}, {"colour": "blue"})


def test_factory_uses_settings():
    app = create_app({"max_message_size": 2048, "ping_interval": 3.0}, environ={})
    # simple-websocket answers the handshake only; the frame layer reads the settings.
    assert app.config["SOCK_SERVER_OPTIONS"] == {"thread_class": HandshakeOnly}
    assert app.extensions["volli"].settings.max_message_size == 2048
    with app.test_client() as http:
        body = http.get("/health").get_json()
    assert body["status"] == "ok" and body["online"] == 0


def _env_names_with_defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", text, re.M))


def test_readme_table_lists_every_setting_with_its_default():
    documented = _env_names_with_defaults((ROOT / "README.md").read_text())
    expected = {f.metadata["env"]: _show(f.default) for f in SETTINGS}
    assert documented == expected


def test_env_example_lists_every_setting_with_its_default():
    lines = (ROOT / "config" / "volli.env.example").read_text().splitlines()
    pairs = dict(line.lstrip("# ").split("=", 1) for line in lines
                 if re.match(r"^#? ?[A-Z0-9_]+=", line))
    assert pairs == {f.metadata["env"]: _show(f.default) for f in SETTINGS}


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)



def test_protocol_doc_lists_every_error_and_close_code():
    from volli.protocol import CloseCode, ErrorCode

    doc = (ROOT / "docs" / "protocol.md").read_text()
    missing = [code.value for code in ErrorCode if f"| `{code.value}` |" not in doc]
    missing += [str(code.value) for code in CloseCode if f"| {code.value} |" not in doc]
    assert not missing, f"docs/protocol.md lacks table rows for {missing}"
