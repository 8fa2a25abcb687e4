# syntax=docker/dockerfile:1
# echowin-gateway as a container: a slim Python, the package and its dependencies (Redis
# client included) in a virtualenv, run by a non-root user.
#
#   docker build -t echowin-gateway:0.1.0 .
#   docker run -d --name echowin-gateway -e ECHOWIN_API_KEY -e GATEWAY_ADMIN_TOKEN \
#     -p 8080:8080 -p 127.0.0.1:9090:9090 \
#     -v echowin-gateway-state:/var/lib/echowin-gateway echowin-gateway:0.1.0
#
# The entrypoint is the `echowin-gateway` command and the default arguments run `serve`, so
# the other commands use the same image:
#   docker exec echowin-gateway echowin-gateway token create \
#     --config /etc/echowin-gateway/gateway.yaml --name crm-sync --scope contacts:read
#   docker run --rm --no-healthcheck echowin-gateway:0.1.0 simulate --host 0.0.0.0 --port 8081
# Config: the default (deploy/docker/gateway.yaml) takes its secrets from the environment;
# mount your own over /etc/echowin-gateway/gateway.yaml to change anything else.
#
# Reproducible: the base is pinned by digest, and every dependency comes from
# requirements.lock (pip-tools, --generate-hashes; pip installs it with --require-hashes),
# the build tools from requirements-build.lock. Give the build the revision it is made from:
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" -t echowin-gateway:0.1.0 .
#
# Moving the base (the same digest on both FROM lines; it names the multi-arch index):
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
# Moving a dependency (after a change to pyproject.toml; tests/test_lockfile.py checks both):
#   pip-compile --generate-hashes --extra redis --extra postgres --extra fast --strip-extras --allow-unsafe \
#     --no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml
#   pip-compile --generate-hashes --only-build-deps --build-deps-for wheel --allow-unsafe \
#     --no-emit-index-url --no-emit-find-links -o requirements-build.lock pyproject.toml

FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# A virtualenv without pip: the build stage's pip installs into it, so the runtime stage gets
# the package and what it imports (redis: the Redis client; postgres: asyncpg, for a
# token_store on PostgreSQL; fast: uvloop, which server.event_loop auto runs on), and no
# build tools.
RUN python -m venv --without-pip /opt/echowin-gateway
COPY requirements.lock requirements-build.lock ./
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements-build.lock \
    && pip --python /opt/echowin-gateway/bin/python install --no-cache-dir --require-hashes \
       --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
# The package alone, built with the locked setuptools: its dependencies are in already.
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
    && pip --python /opt/echowin-gateway/bin/python install --no-cache-dir --no-deps \
       --no-index /tmp/wheels/*.whl \
    && /opt/echowin-gateway/bin/echowin-gateway --version

FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
# VERSION: pyproject.toml's (a test keeps them equal); REVISION: the git commit (build-arg).
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="echowin-gateway" \
      org.opencontainers.image.description="Authenticating, rate-limiting reverse proxy for the echowin REST API" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/echowin/echowin-gateway" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
ENV PATH=/opt/echowin-gateway/bin:$PATH \
    ECHOWIN_GATEWAY_REVISION=${REVISION} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HEALTHCHECK_URL=http://127.0.0.1:9090/healthz
# uid/gid 10001: outside the range of system and first login users on the host, and the
# value the Kubernetes manifests pin in runAsUser/fsGroup.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
    && install -d -o gateway -g gateway -m 0700 /var/lib/echowin-gateway
COPY --from=build /opt/echowin-gateway /opt/echowin-gateway
COPY deploy/docker/gateway.yaml /etc/echowin-gateway/gateway.yaml
USER 10001:10001
WORKDIR /var/lib/echowin-gateway
# The sqlite state (tokens, the budget's write-ahead send log). Unused with redis:// state.
VOLUME ["/var/lib/echowin-gateway"]
# 8080: the proxy (listen). 9090: /healthz, /readyz, /metrics and /admin/* (admin_listen).
EXPOSE 8080 9090
# The image has no curl; Python's urllib fails (non-zero exit) on anything but a 2xx.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GATEWAY_HEALTHCHECK_URL'], timeout=2)"]
# SIGTERM drains: the proxy stops accepting and requests in flight get
# server.shutdown_grace_seconds to finish. Give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["echowin-gateway"]
CMD ["serve", "--config", "/etc/echowin-gateway/gateway.yaml"]
