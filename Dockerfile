# Volli signaling server: gunicorn with the gevent worker on port 8080.
#   docker build -t volli .
#   docker run --rm -p 8080:8080 volli
# Settings are environment variables (config/volli.env.example): -e NAME=value, or
# --env-file with a copy of that file.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# An unprivileged user with a fixed uid, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 volli \
    && useradd --system --uid 10001 --gid volli --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin volli

WORKDIR /app

# The package and its dependencies at the tested versions (constraints.txt; no test
# extras). The code stays root-owned: the server can read it but not change it.
COPY pyproject.toml README.md constraints.txt ./
COPY volli/ ./volli/
RUN pip install -c constraints.txt . && rm -rf build ./*.egg-info

# gunicorn reads gunicorn.conf.py from its working directory.
COPY wsgi.py gunicorn.conf.py ./

USER 10001:10001
# Worker heartbeat files in memory (gunicorn's advice for containers). Prometheus'
# multiprocess files go to /tmp: mount a tmpfs there with a read-only root filesystem.
ENV GUNICORN_CMD_ARGS="--worker-tmp-dir /dev/shm"
EXPOSE 8080

# No curl in the slim image: python asks /health on the probe port (VOLLI_HEALTH_PORT)
# when there is one, else on PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % (int(os.environ.get('VOLLI_HEALTH_PORT') or 0) or os.environ.get('PORT') or '8080'), timeout=4)"]

CMD ["gunicorn", "wsgi:app"]
