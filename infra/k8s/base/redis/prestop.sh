#!/bin/sh
# A planned stop of the master (rollout, node drain) hands the master role over first, so gateways see a
# fail-over of a second or two instead of waiting for the sentinels to notice a dead master.
if redis-cli -p 6379 role 2>/dev/null | head -n 1 | grep -q '^master$'; then
  redis-cli -h microturn-redis-sentinel -p 26379 sentinel failover mymaster || true
  sleep 10
fi
