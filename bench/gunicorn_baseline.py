"""gunicorn config for the baseline relay (bench/baseline_app.py).

It exists so that gunicorn, started from the repo root, does NOT fall back to
./gunicorn.conf.py (Volli's, whose post_worker_init hook needs the Volli app).
Everything that matters is on the command line bench/relay.py builds; see bench/README.md.
"""

# Two gunicorns on one machine would otherwise share ~/.gunicorn/gunicorn.ctl.
control_socket_disable = True
