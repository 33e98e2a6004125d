"""gunicorn entry point: ``gunicorn wsgi:app`` (gunicorn.conf.py sets the gevent worker)."""

from volli.app import create_app

app = create_app()
