# The webhook receiver: a virtualenv built from the pinned requirements, then a runtime
# stage with only that virtualenv and the app, as a non-root user.
#
#   docker build -t webhook-receiver .
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:... .
#
# Both stages use the same base, so the virtualenv's interpreter links stay valid.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# `python3 -m venv` rather than `python -m venv`: some bases only ship `python3`.
RUN python3 -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
# Wheels only: the runtime must not need a compiler, so neither may the build. pip and
# setuptools leave afterwards; nothing at run time installs anything.
RUN /opt/venv/bin/pip install --only-binary=:all: --no-compile -r /tmp/requirements.txt \
 && /opt/venv/bin/pip uninstall -y -q pip setuptools \
 && find /opt/venv -depth -type d -name __pycache__ -exec rm -rf {} + \
 && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib
COPY app /srv/app
# Byte-code compiled here because the runtime user cannot write next to the sources.
RUN /opt/venv/bin/python -m compileall -q /srv/app

FROM ${BASE_IMAGE} AS runtime
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" app \
 && useradd --system --uid "${APP_UID}" --gid app --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin app \
 && mkdir /data \
 && chown app:app /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /srv/app /srv/app
# No PYTHONUNBUFFERED: the log handler flushes warnings at once and request lines within
# 0.2 s itself; unbuffered output would cost a write(2) per request.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/srv \
    PYTHONDONTWRITEBYTECODE=1 \
    DATABASE_URL=sqlite:////data/app.db \
    LOG_LEVEL=INFO
WORKDIR /srv
USER app:app
VOLUME ["/data"]
EXPOSE 8000
# Readiness, with nothing but the standard library: no curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status == 200 else 1)"]
# `python -m app serve` sets up JSON logging before uvicorn writes its first line, and
# handles SIGTERM itself (finishing in-flight requests) while running as PID 1.
ENTRYPOINT ["python", "-m", "app"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
