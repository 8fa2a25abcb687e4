#!/bin/sh
# A small, bounded load for the demo dashboard: LOAD_REQUESTS rounds, one every
# LOAD_INTERVAL_SECONDS, each one GET through the gateway, with a burst of BURST parallel
# requests every 30th round (they queue for budget, or are refused with 429). Now and then
# it also asks for something its token may not do (403) or uses a bad token (401), so
# every panel has data. The token comes from the token-init service.
set -eu

GATEWAY_URL=${GATEWAY_URL:-http://gateway:8080}
REQUESTS=${LOAD_REQUESTS:-3600}
INTERVAL=${LOAD_INTERVAL_SECONDS:-2}
BURST=${LOAD_BURST:-10}
TOKEN=$(cat "${TOKEN_FILE:-/run/load/token}")

call() {
  # call PATH [KEY]: one GET; prints its status, 000 when the gateway did not answer.
  curl -s -o /dev/null -w "%{http_code}" --max-time 15 \
    -H "X-API-Key: ${2:-$TOKEN}" "$GATEWAY_URL$1" || true
}

create_tag() {
  # A POST the token has no scope for (tags:write): the gateway answers 403 itself.
  curl -s -o /dev/null -w "%{http_code}" --max-time 15 -X POST \
    -H "X-API-Key: $TOKEN" -H "Content-Type: application/json" \
    --data '{"name": "demo"}' "$GATEWAY_URL/api/v1/tags" || true
}

i=0
while [ "$i" -lt "$REQUESTS" ]; do
  i=$((i + 1))
  case $((i % 12)) in
    0) status=$(call /api/v1/tags) ;;
    4) status=$(call /api/v1/boards) ;;
    7) status=$(create_tag) ;;
    9) status=$(call /api/v1/contacts egw_not_a_real_token) ;;
    *) status=$(call "/api/v1/contacts?page=$((i % 5 + 1))&limit=20") ;;
  esac
  echo "round $i: $status"
  if [ $((i % 30)) -eq 0 ]; then
    n=0
    while [ "$n" -lt "$BURST" ]; do
      n=$((n + 1))
      call /api/v1/contacts >/dev/null &
    done
    wait
    echo "round $i: burst of $BURST sent"
  fi
  sleep "$INTERVAL"
done
echo "done: $REQUESTS rounds"
