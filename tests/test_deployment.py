"""Deployment files: Dockerfile and .dockerignore (checked statically: no Docker engine is
needed), the systemd unit (statically, and with systemd-analyze when present), and the
nginx sample, run for real in front of a real Volli with TLS and WebSockets through it."""

from __future__ import annotations

import ast
import configparser
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from certs import self_signed
from conftest import ROOT, Client, Server, free_port
from volli.config import load

DEFAULTS = load({})


# --- Dockerfile -------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit inside a continued instruction too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def image_env() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set."""
    env = {}
    for keyword, args in dockerfile():
        if keyword == "ENV":
            for word in shlex.split(args):
                name, equals, value = word.partition("=")
                assert equals, f"ENV {args}: use the NAME=value form"
                env[name] = value
    return env


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per .dockerignore line, in order (the last match decides)."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex, i = regex + line[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((not negated, re.compile(regex + r"\Z")))
    return patterns


def dockerignored(path: str, patterns) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories; the last
    matching pattern wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for excludes, regex in patterns:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = excludes
    return excluded


def copies(instructions) -> list[tuple[list[str], str, str]]:
    """(sources, destination, workdir at that point) of every COPY/ADD from the context."""
    result = []
    workdir = "/"
    for keyword, args in instructions:
        if keyword == "WORKDIR":
            workdir = os.path.join(workdir, args)
        elif keyword in ("COPY", "ADD"):
            words = json.loads(args) if args.startswith("[") else shlex.split(args)
            assert not any(w.startswith("--from") for w in words), "no multi-stage copies expected"
            words = [w for w in words if not w.startswith("--")]
            result.append((words[:-1], words[-1], workdir))
    return result


def test_dockerfile_runs_gunicorn_as_non_root_from_a_slim_python_image():
    instructions = dockerfile()
    keywords = [k for k, _ in instructions]
    froms = [a for k, a in instructions if k == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", froms[0]), froms

    cmd_at = max(i for i, k in enumerate(keywords) if k == "CMD")
    assert json.loads(instructions[cmd_at][1]) == ["gunicorn", "wsgi:app"]
    assert "ENTRYPOINT" not in keywords
    users = [(i, a) for i, (k, a) in enumerate(instructions) if k == "USER"]
    assert users and users[-1][0] < cmd_at, "USER must be set before CMD"
    user = users[-1][1].split(":")[0]
    assert user not in ("root", "0"), user
    if user.isdigit():  # a numeric USER must be the uid the image creates
        assert any(k == "RUN" and re.search(rf"useradd\b.*--uid {user}\b", a)
                   for k, a in instructions[:users[-1][0]]), user
    assert not [k for k, _ in instructions[users[-1][0]:] if k in ("RUN", "COPY", "ADD")], \
        "nothing is installed after switching to the unprivileged user"

    env = image_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == env["PYTHONUNBUFFERED"] == "1"
    assert [a for k, a in instructions if k == "EXPOSE"] == [str(DEFAULTS.port)] == ["8080"]

    installs = [a for k, a in instructions if k == "RUN" and "pip install" in a]
    assert len(installs) == 1
    words = shlex.split(installs[0].split("&&")[0])
    assert words[words.index("install") + 1:] == ["-c", "constraints.txt", "."], \
        "pip install -c constraints.txt . (the tested versions; no extras, no -e)"


def test_dockerfile_copies_what_the_app_needs_and_dockerignore_keeps_it():
    instructions = dockerfile()
    workdirs = [a for k, a in instructions if k == "WORKDIR"]
    app_dir = workdirs[-1]
    assert app_dir.startswith("/")
    copied: dict[str, str] = {}  # context path -> path in the image (Docker's COPY rules)
    for sources, dest, workdir in copies(instructions):
        target = os.path.normpath(os.path.join(workdir, dest))
        for src in sources:
            src = os.path.normpath(src)
            assert (ROOT / src).exists(), f"COPY of a missing {src}"
            if (ROOT / src).is_file() and (dest.endswith("/") or len(sources) > 1):
                copied[src] = os.path.join(target, os.path.basename(src))
            else:  # a file to that name, or a directory's contents into that directory
                copied[src] = target

    def image_path(path: str) -> str | None:
        for src, target in copied.items():
            if path == src:
                return target
            if path.startswith(src + "/"):
                return target + path[len(src):]
        return None

    needed = ["wsgi.py", "gunicorn.conf.py", "pyproject.toml"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    readme = project.get("readme")
    if readme:
        needed.append(readme if isinstance(readme, str) else readme["file"])
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "volli").rglob("*.py")]
    # Local modules that the entry points and the package import must travel too.
    for path in [ROOT / "wsgi.py", ROOT / "gunicorn.conf.py", *(ROOT / "volli").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if (ROOT / f"{top}.py").is_file():
                    needed.append(f"{top}.py")
                elif (ROOT / top).is_dir() and top != "volli":
                    needed += [str(p.relative_to(ROOT)) for p in (ROOT / top).rglob("*.py")]

    patterns = dockerignore_patterns()
    for path in needed:
        assert image_path(path), f"{path} is not copied into the image"
        assert not dockerignored(path, patterns), f".dockerignore excludes {path}"
    # gunicorn runs in WORKDIR and reads ./gunicorn.conf.py and ./wsgi.py there.
    assert image_path("wsgi.py") == f"{app_dir}/wsgi.py"
    assert image_path("gunicorn.conf.py") == f"{app_dir}/gunicorn.conf.py"
    assert image_path("volli/app.py") == f"{app_dir}/volli/app.py"
    # pip install . runs where pyproject.toml, README.md and volli/ already are.
    install_at = next(i for i, (k, a) in enumerate(instructions)
                      if k == "RUN" and "pip install" in a)
    before = {s.rstrip("/") for srcs, _, _ in copies(instructions[:install_at]) for s in srcs}
    assert {"pyproject.toml", "constraints.txt", "volli", *([readme] if readme else [])} <= before
    assert image_path("pyproject.toml") == f"{app_dir}/pyproject.toml"

    # What stays out of the context.
    for path in [".git/HEAD", ".venv/bin/python", "tests/conftest.py", ".pytest_cache/x",
                 "volli/__pycache__/app.cpython-311.pyc", ".hypothesis/x", "bench/results/x",
                 "volli_signaling.egg-info/PKG-INFO", "build/lib/x", ".env", "config/prod.env"]:
        assert dockerignored(path, patterns), f".dockerignore lets {path} in"


def test_dockerfile_healthcheck_probes_health_on_port(tmp_path):
    check = next(a for k, a in dockerfile() if k == "HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    args = json.loads(command)
    assert args[0] == "python", "the slim image has no curl"
    srv = Server(tmp_path, image_env())  # with the image's environment (GUNICORN_CMD_ARGS)
    try:
        srv.wait_ready()
        env = {**os.environ, **image_env(), "PORT": str(srv.port)}
        probe = subprocess.run([sys.executable, *args[1:]], env=env, capture_output=True,
                               timeout=30)
        assert probe.returncode == 0, probe.stderr
        env["PORT"] = str(free_port())  # nothing listens there
        probe = subprocess.run([sys.executable, *args[1:]], env=env, capture_output=True,
                               timeout=30)
        assert probe.returncode != 0
    finally:
        srv.stop()
    # Unset or empty PORT means the server's default port, 8080.
    assert "'8080'" in args[-1] and "/health" in args[-1] and "127.0.0.1" in args[-1]
    assert re.search(r"--timeout=\d+s", options) and re.search(r"--interval=\d+s", options)


# --- systemd ----------------------------------------------------------------------------

def seconds(value: str) -> float:
    total, units = 0.0, {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[suffix]
    return total


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((ROOT / "config" / "volli.service").read_text())
    return parser


def test_systemd_unit_runs_gunicorn_gracefully_and_hardened():
    service = unit()["Service"]
    assert service["Type"] in ("simple", "exec")
    assert service["User"] and service["User"] not in ("root", "0")
    assert service["WorkingDirectory"] == "/opt/volli"
    command = shlex.split(service["ExecStart"])
    assert command == ["/opt/volli/.venv/bin/gunicorn", "wsgi:app"]
    assert service["EnvironmentFile"] == "-/etc/volli/volli.env"
    assert (ROOT / "config" / "volli.env.example").is_file()
    assert service["KillSignal"] == "SIGTERM"
    assert service.get("KillMode", "control-group") in ("mixed", "control-group")
    graceful = re.search(r"^graceful_timeout\s*=\s*(\d+)\s*$",
                         (ROOT / "gunicorn.conf.py").read_text(), re.M)
    assert graceful, "gunicorn.conf.py sets graceful_timeout to a number"
    assert seconds(service["TimeoutStopSec"]) > int(graceful.group(1))
    assert service["Restart"] == "on-failure"
    soft = service["LimitNOFILE"].split(":")[0]
    assert int(soft) >= DEFAULTS.max_connections + 100 == 10100
    for key, value in {"NoNewPrivileges": "true", "ProtectSystem": "strict",
                       "PrivateTmp": "true", "ProtectHome": "true"}.items():
        assert service[key] == value, key
    assert "multi-user.target" in unit()["Install"]["WantedBy"]


def test_systemd_analyze_verifies_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: run the suite with `bash tests/run.sh`")
    # verify checks that ExecStart exists: point it at this virtualenv's gunicorn.
    gunicorn = Path(sys.executable).parent / "gunicorn"
    assert gunicorn.exists()
    text = (ROOT / "config" / "volli.service").read_text()
    assert text.count("/opt/volli/.venv/bin/gunicorn") == 1
    copy = tmp_path / "volli.service"
    copy.write_text(text.replace("/opt/volli/.venv/bin/gunicorn", str(gunicorn)))
    result = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True,
                            text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "volli.service" not in output, output


# --- nginx ------------------------------------------------------------------------------

NGINX_SAMPLE = ROOT / "config" / "nginx.conf"


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("nginx is not installed: run the suite with `bash tests/run.sh`, "
                    "which installs it")
    return found


def without_comments(text: str) -> str:
    return re.sub(r"#[^\n]*", "", text)


def block(text: str, header: str) -> str:
    """The body of the first `header { ... }` block (header is a regex)."""
    match = re.search(header + r"\s*\{", text)
    assert match, f"no block {header!r}"
    depth, start = 1, match.end()
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    raise AssertionError(f"unbalanced block {header!r}")


def with_certificate(text: str, cert: Path, key: Path) -> str:
    text, n = re.subn(r"^(\s*ssl_certificate)\s+\S+;", rf"\1 {cert};", text, flags=re.M)
    assert n == 1, "one ssl_certificate expected"
    text, n = re.subn(r"^(\s*ssl_certificate_key)\s+\S+;", rf"\1 {key};", text, flags=re.M)
    assert n == 1, "one ssl_certificate_key expected"
    return text


def render_for_test(text: str, http_port: int, https_port: int, upstream_port: int) -> str:
    """The sample on loopback test ports, with its upstream at the test's Volli."""
    seen = []

    def listen(match: re.Match[str]) -> str:
        indent, address, rest = match.groups()
        if address.startswith("["):
            return ""  # IPv6 listeners: the test stays on 127.0.0.1
        port = int(address.rsplit(":", 1)[-1])
        seen.append(port)
        return f"{indent}listen 127.0.0.1:{ {80: http_port, 443: https_port}[port]}{rest};"

    text = re.sub(r"^(\s*)listen\s+([^\s;]+)([^;]*);", listen, text, flags=re.M)
    assert sorted(seen) == [80, 443], seen
    text, n = re.subn(r"^(\s*server\s+)127\.0\.0\.1:8080\b", rf"\g<1>127.0.0.1:{upstream_port}",
                      text, flags=re.M)
    assert n == 1, "one active upstream server 127.0.0.1:8080 expected"
    return text


def main_config(prefix: Path, site: str) -> Path:
    """A main nginx.conf that includes the site and keeps every file under prefix."""
    (prefix / "volli.conf").write_text(site)
    temp = "\n".join(f"    {name}_temp_path {prefix / name};"
                     for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
worker_shutdown_timeout 5s;
events {{ worker_connections 256; }}
http {{
    access_log {prefix / "access.log"};
{temp}
    include {prefix / "volli.conf"};
}}
""")
    return conf


def nginx_test_config(conf: Path, prefix: Path) -> None:
    result = subprocess.run([nginx_binary(), "-t", "-e", str(prefix / "error.log"),
                             "-p", f"{prefix}/", "-c", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test is successful" in result.stderr
    assert "[warn]" not in result.stderr, result.stderr


def test_nginx_sample_proxies_the_websocket_with_long_timeouts():
    text = without_comments(NGINX_SAMPLE.read_text())
    tls = block(text, r"server(?=\s*\{[^{}]*listen\s+443\b)")
    signaling = block(tls, r"location\s+(=\s*)?/signaling")
    directives = {}
    for statement in signaling.split(";"):
        words = statement.split()
        if words and words[0] == "proxy_set_header":
            directives[" ".join(words[:2])] = " ".join(words[2:])
        elif words:
            directives[words[0]] = " ".join(words[1:])
    assert directives["proxy_pass"] == "http://volli"
    assert directives["proxy_http_version"] == "1.1"
    assert directives["proxy_set_header Upgrade"] == "$http_upgrade"
    upgrade = directives["proxy_set_header Connection"]
    assert upgrade == '"upgrade"' or re.search(
        rf"map\s+\$http_upgrade\s+{re.escape(upgrade)}\s*\{{\s*default\s+upgrade;", text)
    assert directives["proxy_set_header Host"] == "$host"
    assert directives["proxy_set_header X-Real-IP"] == "$remote_addr"
    assert directives["proxy_set_header X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert directives["proxy_set_header X-Forwarded-Proto"] == "$scheme"
    assert directives["proxy_buffering"] == "off"
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(directives[timeout]) >= 2 * DEFAULTS.ping_interval, timeout
    for path in ("/health", "/ready", "/metrics"):
        assert "proxy_pass http://volli;" in block(tls, rf"location\s+(=\s*)?{path}")
    metrics = block(tls, r"location\s+(=\s*)?/metrics")
    assert "allow 127.0.0.1;" in metrics and metrics.strip().count("deny all;") == 1
    assert re.search(r"upstream\s+volli\s*\{[^}]*server\s+127\.0\.0\.1:8080", text)
    plain = block(text, r"server(?=\s*\{[^{}]*listen\s+80\b)")
    assert "return 301 https://$host$request_uri;" in plain


def test_nginx_sample_passes_nginx_t_as_written(tmp_path):
    """Only the placeholder certificate paths change: listen 80/443 and IPv6 included
    (nginx -t does not bind)."""
    cert, key = self_signed(tmp_path)
    site = with_certificate(NGINX_SAMPLE.read_text(), cert, key)
    nginx_test_config(main_config(tmp_path, site), tmp_path)


class Nginx:
    """nginx in the foreground (daemon off) on the rendered sample; output to a file."""

    def __init__(self, prefix: Path, conf: Path, ports: tuple[int, ...]) -> None:
        self.prefix = prefix
        self._out = open(prefix / "nginx.out", "wb")
        self.proc = subprocess.Popen(
            [nginx_binary(), "-e", str(prefix / "error.log"), "-p", f"{prefix}/",
             "-c", str(conf), "-g", "daemon off;"],
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + 10
        pending = list(ports)
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
            assert time.monotonic() < end, f"nginx did not listen within 10 s:\n{self.log()}"
            try:
                socket.create_connection(("127.0.0.1", pending[0]), timeout=1).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.05)

    def log(self) -> str:
        parts = [self.prefix / "nginx.out", self.prefix / "error.log"]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    def stop(self) -> int | None:
        """Graceful stop (SIGQUIT), then fast (SIGTERM), then SIGKILL; every wait bounded."""
        code = None
        for sig, wait in ((signal.SIGQUIT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            try:
                if sig == signal.SIGKILL:
                    os.killpg(self.proc.pid, sig)
                else:
                    self.proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                code = self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        self._out.close()
        return code if code is not None else self.proc.returncode


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """A real Volli (VOLLI_TRUSTED_PROXIES=1) behind nginx running the rendered sample."""
    prefix = tmp_path_factory.mktemp("nginx")
    srv = Server(prefix, {"VOLLI_TRUSTED_PROXIES": "1"})
    nginx = None
    try:
        srv.wait_ready()
        cert, key = self_signed(prefix)
        http_port, https_port = free_port(), free_port()
        site = render_for_test(with_certificate(NGINX_SAMPLE.read_text(), cert, key),
                               http_port, https_port, srv.port)
        conf = main_config(prefix, site)
        nginx_test_config(conf, prefix)
        nginx = Nginx(prefix, conf, (http_port, https_port))
        context = ssl.create_default_context(cafile=str(cert))
        yield {"server": srv, "nginx": nginx, "http": http_port, "https": https_port,
               "context": context, "cert": cert}
    finally:
        if nginx is not None:
            code = nginx.stop()
            assert code == 0, f"nginx did not stop cleanly ({code}):\n{nginx.log()}"
        srv.stop()


def https_get(proxied, path: str, source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", proxied["https"], timeout=5,
                                       context=proxied["context"], source_address=(source, 0))
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_websockets_relay_both_ways_through_nginx_over_tls(proxied):
    srv = proxied["server"]
    url = f"wss://127.0.0.1:{proxied['https']}/signaling"
    # Alice comes from 127.0.0.2 and claims to be 203.0.113.9. nginx appends the address
    # it saw, so Volli gets "X-Forwarded-For: 203.0.113.9, 127.0.0.2" from 127.0.0.1 and,
    # trusting one hop, takes the last entry: 127.0.0.2 (neither the forged address nor
    # nginx's own).
    alice = Client(url, ssl=proxied["context"], source_address=("127.0.0.2", 0),
                   additional_headers={"X-Forwarded-For": "203.0.113.9"})
    bob = Client(url, ssl=proxied["context"])
    try:
        alice.register("alice@volli.app")
        bob.register("bob@volli.app")
        alice.send({"type": "offer", "to": "bob@volli.app",
                    "offer": {"type": "offer", "sdp": "via nginx"}})
        assert bob.recv() == {"type": "offer", "to": "bob@volli.app", "from": "alice@volli.app",
                              "offer": {"type": "offer", "sdp": "via nginx"}}
        bob.send({"type": "offer", "to": "alice@volli.app",
                  "offer": {"type": "offer", "sdp": "and back"}})
        assert bob.request({"type": "ping"}) == {"type": "pong"}
        reply = alice.recv()
        assert reply["from"] == "bob@volli.app" and reply["offer"]["sdp"] == "and back"
        bob.send({"type": "answer", "to": "alice@volli.app",
                  "answer": {"type": "answer", "sdp": "answered"}})
        assert alice.recv()["answer"] == {"type": "answer", "sdp": "answered"}
    finally:
        alice.close()
        bob.close()
    srv.wait_log("ip=127.0.0.1 user=bob@volli.app code=")  # the connection closed lines
    log = srv.wait_log("ip=127.0.0.2 user=alice@volli.app code=")
    closed = re.findall(r"connection closed id=(\S+) ip=(\S+)", log)
    assert sorted(ip for _, ip in closed) == ["127.0.0.1", "127.0.0.2"], closed
    alice_id = next(cid for cid, ip in closed if ip == "127.0.0.2")
    assert f"connection closed id={alice_id} ip=127.0.0.2 user=alice@volli.app" in log
    assert re.search(rf"registered user=alice@volli\.app id={alice_id} ip=127\.0\.0\.2\b", log)
    assert "203.0.113.9" not in log


def test_health_ready_and_metrics_through_nginx(proxied):
    status, headers, body = https_get(proxied, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert headers["Strict-Transport-Security"].startswith("max-age=")
    status, _, body = https_get(proxied, "/ready")
    assert status == 200 and json.loads(body)["ready"] is True
    # /metrics: an allowed address gets what Volli answers; any other gets 403 from nginx.
    status, _, _ = https_get(proxied, "/metrics")
    conn = http.client.HTTPConnection("127.0.0.1", proxied["server"].port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        direct = conn.getresponse()
        direct.read()
    finally:
        conn.close()
    assert status == direct.status != 403
    status, _, _ = https_get(proxied, "/metrics", source="127.0.0.2")
    assert status == 403
    status, _, _ = https_get(proxied, "/elsewhere")
    assert status == 404


def test_plain_http_redirects_to_https(proxied):
    conn = http.client.HTTPConnection("127.0.0.1", proxied["http"], timeout=5)
    try:
        conn.request("GET", "/signaling?x=1")
        response = conn.getresponse()
        assert response.status == 301
        assert response.getheader("Location") == "https://127.0.0.1/signaling?x=1"
    finally:
        conn.close()


def test_constraints_pin_every_dependency_within_its_declared_range():
    """pyproject.toml declares compatible ranges; constraints.txt is the tested set that CI,
    the image and the README install: one exact pin per package, inside each range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [
        dep for extra in project["optional-dependencies"].values() for dep in extra]
    for text in declared:
        req = Requirement(text)
        assert req.specifier, f"{text}: declare a range, the pin goes in constraints.txt"
        assert not any(spec.operator == "==" for spec in req.specifier), text
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(version), f"{req.name}=={version} is outside {text}"
    assert "-c constraints.txt" in (ROOT / "tests" / "run.sh").read_text()
    assert "pip install -c constraints.txt -e ." in (ROOT / "README.md").read_text()
