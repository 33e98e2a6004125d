"""The operator's commands: an HTTP endpoint (enabled by VOLLI_ADMIN_TOKEN) and the
command line that calls it.

    python -m volli.admin unbind USER_ID [--url http://127.0.0.1:8080]

forgets USER_ID's key binding (say its owner lost the key) and closes a connection that
holds the ID (it gets ``session-replaced`` and 4000), so the next registration may bind
a new key. With Redis it acts across every worker and host; with the in-memory backend,
on the one worker there is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from flask import Blueprint, abort, jsonify

from .backends import BackendUnavailable
from .http import bearer_refusal
from .protocol.messages import USER_ID_MAX
from .runtime import get_runtime

log = logging.getLogger("volli.admin")

bp = Blueprint("admin", __name__)


@bp.delete("/admin/bindings/<path:user_id>")
def unbind(user_id: str):
    token = get_runtime().settings.admin_token
    if not token:
        abort(404)  # disabled: nothing to see here
    refusal = bearer_refusal(token)
    if refusal is not None:
        return refusal
    if len(user_id) > USER_ID_MAX:
        abort(404)
    try:
        found = get_runtime().backend.unbind(user_id)
    except BackendUnavailable:
        response = jsonify(error="unavailable", message="presence store unreachable")
        response.status_code = 503
        return response
    log.warning("operator unbound user=%s (found=%s)", user_id, found)
    response = jsonify(userId=user_id, unbound=found)
    response.status_code = 200 if found else 404
    return response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m volli.admin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    unbind_cmd = commands.add_parser("unbind", help="forget a user ID's key binding")
    unbind_cmd.add_argument("user_id")
    unbind_cmd.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('PORT', '8080')}",
                            help="a Volli server (default: http://127.0.0.1:$PORT)")
    args = parser.parse_args(argv)
    token = os.environ.get("VOLLI_ADMIN_TOKEN", "")
    if not token:
        print("set VOLLI_ADMIN_TOKEN to the server's admin token", file=sys.stderr)
        return 2
    url = f"{args.url.rstrip('/')}/admin/bindings/{urllib.parse.quote(args.user_id, safe='')}"
    request = urllib.request.Request(url, method="DELETE",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        if exc.code == 404 and text.startswith("{"):
            print(f"{args.user_id!r} had no binding and no connection", file=sys.stderr)
        else:
            print(f"HTTP {exc.code}: {text[:200]}", file=sys.stderr)
        return 1
    print(f"unbound {body['userId']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
