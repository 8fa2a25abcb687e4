#!/usr/bin/env bash
# What the tests need beyond Python packages, installed when missing (Debian packages; needs
# root) and started when down: redis-server (and Redis on 127.0.0.1:6379), PostgreSQL on
# 127.0.0.1:5432 (user postgres, trust), prometheus and promtool, chromium. `make test` runs this first, so the README's test command works on a
# fresh machine; the tests fail, never skip, when one of these is absent.
set -euo pipefail

# Redis: tests that need it fail (never skip) when it is absent, so make sure it is up.
# The outage tests also start their own redis-server on free ports: the binary must exist.
if ! command -v redis-server >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq redis-server
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && break; sleep 0.1; done
fi

# PostgreSQL: the token store's tests (tests/state/pg_server.py) make their own databases on
# 127.0.0.1:5432 as user postgres without a password, and fail (never skip) when it is down.
# When nothing listens there, a throwaway cluster (trust on loopback only) is made and started.
if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  initdb_bin=$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$initdb_bin" ]; then
    policy=/usr/sbin/policy-rc.d  # install it without starting the package's own cluster
    made_policy=
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    rc=0
    { apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
    } || rc=$?
    if [ -n "$made_policy" ]; then rm -f "$policy"; fi
    [ "$rc" -eq 0 ] || exit "$rc"
    initdb_bin=$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)
  fi
  pg_bin=$(dirname "$initdb_bin")
  pgdata=${EGW_TEST_PGDATA:-/tmp/egw-test-pgdata}
  as_pg=()
  if [ "$(id -u)" -eq 0 ]; then  # the server refuses to run as root
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    as_pg=(runuser -u postgres --)
  fi
  if [ ! -s "$pgdata/PG_VERSION" ]; then
    mkdir -p "$pgdata"
    if [ ${#as_pg[@]} -gt 0 ]; then chown postgres "$pgdata"; fi
    "${as_pg[@]}" "$pg_bin/initdb" -D "$pgdata" -U postgres --auth=trust >/dev/null
  fi
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w -t 30 start \
    -o "-c listen_addresses=127.0.0.1 -p 5432 -k /tmp" >/dev/null
fi
# Redis Sentinel and Cluster: tests/state/redis/shapes.py starts a master, a replica and
# three redis-sentinel processes, and clusters joined by `redis-cli --cluster create`, on free
# loopback ports; tests/state/redis/test_tls_acl.py a TLS-only redis-server (Debian's build
# has TLS: `redis-server --tls-port` works). They fail, never skip, without these binaries.
if ! command -v redis-sentinel >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-sentinel redis-tools
fi
# (The package's own sentinel service, if it starts, is not used: the tests pick free ports.)

# Prometheus: tests/test_observability.py runs promtool on the alert rules and the dashboard's
# queries, and starts its own prometheus on a free loopback port; it fails (never skips)
# without them. No service may be left running by the package (it would hold :9090): invoke-rc.d
# is told to start nothing while the package installs (a policy-rc.d that exits 101).
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
  fi
  rc=0
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
  } || rc=$?
  if [ -n "$made_policy" ]; then rm -f "$policy"; fi
  [ "$rc" -eq 0 ] || exit "$rc"
fi

# Chromium: tests/test_status.py renders the /status page headless and keeps a screenshot.
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi

# openssl: tests/test_upstream.py makes a throwaway certificate for its TLS upstream, and
# tests/state/redis/shapes.py a CA and certificates for the TLS Redis.
if ! command -v openssl >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl
fi

# kubectl: tests/test_manifests.py renders deploy/kubernetes with `kubectl kustomize` and
# validates every object. Without kubectl those tests skip (saying so), and fail under CI
# (CI=true). Installed from the distribution when it packages it; otherwise say how.
if ! command -v kubectl >/dev/null 2>&1; then
  if apt-cache show kubectl >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubectl
  else
    echo "kubectl not found: install it (https://kubernetes.io/docs/tasks/tools/) for" \
      "tests/test_manifests.py" >&2
  fi
fi
