"""Where session records live: in memory (the embedded default) or in Redis (``--redis URL``).

Redis keys share the ``{sid}`` hash tag so that everything of one session lands on one Redis Cluster slot:
``microturn:{sid}:record`` is a hash of the :class:`~microturn.contracts.SessionRecord` fields (``config`` as JSON),
with a TTL refreshed on every write.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Protocol

import redis.asyncio as aioredis

from microturn.contracts import SessionRecord


class StoreUnavailable(Exception):
    """The session store cannot be reached."""


class SessionStore(Protocol):
    async def put(self, record: SessionRecord) -> None: ...

    async def get(self, session_id: str) -> SessionRecord | None: ...

    async def delete(self, session_id: str) -> None: ...

    async def close(self) -> None: ...


class MemorySessionStore:
    """Session records in this process; lost when it exits."""

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}

    async def put(self, record: SessionRecord) -> None:
        self._records[record.session_id] = dataclasses.replace(record)

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        return None if record is None else dataclasses.replace(record)

    async def delete(self, session_id: str) -> None:
        self._records.pop(session_id, None)

    async def close(self) -> None:
        self._records.clear()


def record_key(session_id: str) -> str:
    return f"microturn:{{{session_id}}}:record"


class RedisSessionStore:
    """Session records in Redis, expiring ``ttl_s`` after their last write."""

    def __init__(self, url: str, ttl_s: int = 3600) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.ttl_s = ttl_s

    async def put(self, record: SessionRecord) -> None:
        fields = dataclasses.asdict(record)
        fields["config"] = json.dumps(record.config)
        key = record_key(record.session_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
                pipe.expire(key, self.ttl_s)
                await pipe.execute()
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def get(self, session_id: str) -> SessionRecord | None:
        try:
            raw = await self._redis.hgetall(record_key(session_id))
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not raw:
            return None
        f = {_text(k): _text(v) for k, v in raw.items()}
        return SessionRecord(
            session_id=f["session_id"], owner=f["owner"], model=f["model"], created=float(f["created"]),
            last_seen=float(f["last_seen"]), micro_turn=int(f["micro_turn"]), state=f["state"],
            config=json.loads(f["config"]),
        )

    async def delete(self, session_id: str) -> None:
        try:
            await self._redis.delete(record_key(session_id))
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
