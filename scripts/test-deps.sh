#!/usr/bin/env bash
# What the tests need beyond Python packages, installed when missing (Debian packages; needs
# root) and started when down: redis-server (and Redis on 127.0.0.1:6379), prometheus and
# promtool, chromium. `make test` runs this first, so the README's test command works on a
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
