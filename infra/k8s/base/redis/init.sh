#!/bin/sh
# Writes this pod's redis.conf and sentinel.conf into /etc/redis-run. The master is whoever the sentinels say it is;
# when none answer (first start of the whole set), pod 0 is the master and the others replicate it.
set -eu
SVC=microturn-redis
DOMAIN="${SVC}.${POD_NAMESPACE}.svc.cluster.local"
SELF="${POD_NAME}.${DOMAIN}"
ORDINAL="${POD_NAME##*-}"

MASTER="$(timeout 5 redis-cli -h "${SVC}-sentinel" -p 26379 --raw sentinel get-master-addr-by-name mymaster \
  2>/dev/null | head -n 1 || true)"
case "${MASTER}" in
  "" | *ERR* | *rror*) MASTER="" ;;
esac
if [ -z "${MASTER}" ]; then
  MASTER="${SVC}-0.${DOMAIN}"
fi
echo "init: ${SELF} (ordinal ${ORDINAL}); master ${MASTER}"

cp /etc/redis-config/redis.conf /etc/redis-run/redis.conf
echo "replica-announce-ip ${SELF}" >> /etc/redis-run/redis.conf
if [ "${MASTER}" != "${SELF}" ]; then
  echo "replicaof ${MASTER} 6379" >> /etc/redis-run/redis.conf
fi

cp /etc/redis-config/sentinel.conf /etc/redis-run/sentinel.conf
{
  echo "sentinel announce-ip ${SELF}"
  echo "sentinel announce-port 26379"
  echo "sentinel monitor mymaster ${MASTER} 6379 ${SENTINEL_QUORUM:-2}"
  echo "sentinel down-after-milliseconds mymaster 5000"
  echo "sentinel failover-timeout mymaster 60000"
  echo "sentinel parallel-syncs mymaster 1"
} >> /etc/redis-run/sentinel.conf
