"""A bare flask-sock relay: the baseline bench/relay.py compares Volli against.

No validation, no send queues, no limits: a dict of userId -> ws, parse JSON, look up
the target, re-encode and send. bench/relay.py runs it from the repo root as

    python -m gunicorn -c bench/gunicorn_baseline.py -k gevent -w 1 \
        --worker-connections 20000 -b 127.0.0.1:PORT bench.baseline_app:app

(-c keeps gunicorn from reading Volli's ./gunicorn.conf.py.)
"""

import json

from flask import Flask
from flask_sock import Sock

app = Flask(__name__)
sock = Sock(app)
users = {}  # userId -> ws


@app.get("/health")
def health():
    return {"status": "ok", "online": len(users)}


@sock.route("/signaling")
def signaling(ws):
    me = None
    try:
        while True:
            msg = json.loads(ws.receive())
            kind = msg.get("type")
            if kind == "register":
                me = msg["userId"]
                users[me] = ws
                ws.send(json.dumps({"type": "registered", "userId": me}))
            elif kind in ("offer", "answer", "ice-candidate") and me is not None:
                target = users.get(msg.get("to"))
                if target is None:
                    ws.send(json.dumps({"type": "error", "code": "peer-offline"}))
                    continue
                msg["from"] = me
                target.send(json.dumps(msg))
    finally:
        if me is not None and users.get(me) is ws:
            del users[me]
