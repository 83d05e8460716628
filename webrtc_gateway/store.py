"""Session state: in memory (the embedded default) or in Redis (``--redis URL``).

Per session, five Redis keys share the ``{sid}`` hash tag, so that everything of one session lands on one Redis
Cluster slot and one Lua script may touch them all:

=================================  =====================================================================================
``microturn:{sid}:record``         hash: the :class:`~microturn.contracts.SessionRecord` fields (``config`` as JSON)
``microturn:{sid}:log``            stream, one entry per micro-turn: ``turn`` and ``ctx``, the engine's context record
                                   (model input features and the model's own output tokens — never raw media; ``echo``:
                                   empty, ``tally``: 1 byte + typed text, ``reference``: see inference/README.md)
``microturn:{sid}:events``         stream: ``turn`` and ``msg``, every caption and event sent to the browser, and the
                                   text the user typed (``{"type": "user_text", ...}``), as JSON
``microturn:{sid}:tasks``          hash: background tasks, field ``TASK_ID`` → the task as JSON
                                   (:class:`~inference.background.tasks.Task`), and ``delivered:TASK_ID`` → how many of
                                   its items the model's context has received, set by the same script that appends the
                                   log entry of the micro-turn that carried them (so exactly once, also after a resume)
``microturn:{sid}:worker``         string: the id of the inference worker the session is assigned to (remote workers
                                   only; see :mod:`webrtc_gateway.workers`)
=================================  =====================================================================================

``--redis`` takes ``redis://[:PASSWORD@]HOST:PORT/DB`` or, for Redis with Sentinel,
``redis+sentinel://[:PASSWORD@]SENTINEL:PORT[,SENTINEL:PORT…]/MASTER_NAME/DB``: the store asks the sentinels which
server is the master, and asks again after a failover.

All five expire ``ttl_s`` after the last write (the heartbeat of a live session is its micro-turns); a closed
session's keys are deleted. Appends are fenced: a gateway writes only while the record names it as owner, so after a
resume moved the session, the old owner's late writes are refused and tell it to let go.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from inference.background.tasks import Task
from microturn.contracts import SessionRecord


class StoreUnavailable(Exception):
    """The session store cannot be reached."""


@dataclass
class LogEntry:
    """One micro-turn of one session, as written to the conversation log."""

    session_id: str
    turn: int
    context: bytes
    messages: list[dict[str, Any]] = field(default_factory=list)  # captions and events sent for this micro-turn
    delivered: dict[str, int] = field(default_factory=dict)  # task id → its items delivered up to this micro-turn


class SessionStore(Protocol):
    async def put(self, record: SessionRecord) -> None: ...

    async def get(self, session_id: str) -> SessionRecord | None: ...

    async def delete(self, session_id: str) -> None: ...

    async def append(self, owner: str, entries: list[LogEntry]) -> list[bool]:
        """Write entries in one round trip; False for those refused because ``owner`` no longer owns the session."""
        ...

    async def history(self, session_id: str) -> tuple[list[tuple[int, bytes]], float | None]:
        """The log: (turn, context) in order, and the wall time (unix s) of its last entry."""
        ...

    async def messages_after(self, session_id: str, turn: int) -> list[dict[str, Any]]: ...

    async def claim(self, session_id: str, old_hash: str, new_hash: str, owner: str, owner_url: str = "") -> bool:
        """Atomically make ``owner`` (reached at ``owner_url``) the owner if the record's resume-token hash is
        ``old_hash``; rotate it."""
        ...

    async def put_task(self, task: Task) -> None: ...

    async def tasks(self, session_id: str) -> tuple[list[Task], dict[str, int]]:
        """The session's background tasks (oldest first) and how many items of each were delivered."""
        ...

    async def set_worker(self, session_id: str, worker_id: str) -> None:
        """Record which inference worker the session is assigned to."""
        ...

    async def worker_of(self, session_id: str) -> str | None: ...

    async def close(self) -> None: ...


class MemorySessionStore:
    """Session state in this process; lost when it exits."""

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._logs: dict[str, list[tuple[int, bytes, float]]] = {}
        self._messages: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self._tasks: dict[str, dict[str, Task]] = {}
        self._delivered: dict[str, dict[str, int]] = {}
        self._workers: dict[str, str] = {}

    async def put(self, record: SessionRecord) -> None:
        self._records[record.session_id] = dataclasses.replace(record)

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        return None if record is None else dataclasses.replace(record)

    async def delete(self, session_id: str) -> None:
        self._records.pop(session_id, None)
        self._logs.pop(session_id, None)
        self._messages.pop(session_id, None)
        self._tasks.pop(session_id, None)
        self._delivered.pop(session_id, None)
        self._workers.pop(session_id, None)

    async def append(self, owner: str, entries: list[LogEntry]) -> list[bool]:
        accepted = []
        for e in entries:
            record = self._records.get(e.session_id)
            ok = record is not None and record.owner == owner
            if ok and record is not None:
                self._logs.setdefault(e.session_id, []).append((e.turn, e.context, time.time()))
                self._messages.setdefault(e.session_id, []).extend((e.turn, m) for m in e.messages)
                self._delivered.setdefault(e.session_id, {}).update(e.delivered)
                record.micro_turn, record.last_seen = e.turn, time.time()
            accepted.append(ok)
        return accepted

    async def history(self, session_id: str) -> tuple[list[tuple[int, bytes]], float | None]:
        log = self._logs.get(session_id, [])
        return [(t, c) for t, c, _ in log], (log[-1][2] if log else None)

    async def messages_after(self, session_id: str, turn: int) -> list[dict[str, Any]]:
        return [m for t, m in self._messages.get(session_id, []) if t > turn]

    async def claim(self, session_id: str, old_hash: str, new_hash: str, owner: str, owner_url: str = "") -> bool:
        record = self._records.get(session_id)
        if record is None or record.resume_hash != old_hash:
            return False
        record.owner, record.owner_url, record.resume_hash = owner, owner_url, new_hash
        return True

    async def put_task(self, task: Task) -> None:
        self._tasks.setdefault(task.session_id, {})[task.task_id] = Task.decode(task.encode())

    async def tasks(self, session_id: str) -> tuple[list[Task], dict[str, int]]:
        tasks = sorted(self._tasks.get(session_id, {}).values(), key=lambda t: t.created)
        return [Task.decode(t.encode()) for t in tasks], dict(self._delivered.get(session_id, {}))

    async def set_worker(self, session_id: str, worker_id: str) -> None:
        self._workers[session_id] = worker_id

    async def worker_of(self, session_id: str) -> str | None:
        return self._workers.get(session_id)

    async def close(self) -> None:
        self._workers.clear()
        self._records.clear()
        self._logs.clear()
        self._messages.clear()
        self._tasks.clear()
        self._delivered.clear()


def record_key(session_id: str) -> str:
    return f"microturn:{{{session_id}}}:record"


def log_key(session_id: str) -> str:
    return f"microturn:{{{session_id}}}:log"


def events_key(session_id: str) -> str:
    return f"microturn:{{{session_id}}}:events"


def tasks_key(session_id: str) -> str:
    return f"microturn:{{{session_id}}}:tasks"


def worker_key(session_id: str) -> str:
    return f"microturn:{{{session_id}}}:worker"


def connect(url: str) -> aioredis.Redis:
    """A client for ``redis://…`` or ``redis+sentinel://…`` (see the module docstring)."""
    options: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2}
    if not url.startswith("redis+sentinel://"):
        return aioredis.Redis.from_url(url, **options)
    parsed = urlsplit(url)
    password = unquote(parsed.password) if parsed.password else None
    hosts = parsed.netloc.rpartition("@")[2]
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        sentinels.append((host or item, int(port) if host else 26379))
    parts = [p for p in parsed.path.split("/") if p]
    if not parts:
        raise ValueError(f"{url}: name the master, e.g. redis+sentinel://sentinel:26379/mymaster/0")
    db = int(parts[1]) if len(parts) > 1 else 0
    sentinel = Sentinel(sentinels, sentinel_kwargs=options, **options)
    return sentinel.master_for(parts[0], db=db, password=password)


# KEYS: record, log, events, tasks, worker. ARGV: owner, turn, context, now, ttl, n messages, message JSON…, then
# pairs of task id and items delivered
_APPEND = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], '*', 'turn', ARGV[2], 'ctx', ARGV[3])
local last = 6 + tonumber(ARGV[6])
for i = 7, last do redis.call('XADD', KEYS[3], '*', 'turn', ARGV[2], 'msg', ARGV[i]) end
for i = last + 1, #ARGV, 2 do redis.call('HSET', KEYS[4], 'delivered:' .. ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'micro_turn', ARGV[2], 'last_seen', ARGV[4])
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
return 1
"""

# KEYS: record. ARGV: old hash, new hash, owner, now, owner URL.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'resume_hash') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'resume_hash', ARGV[2], 'owner', ARGV[3], 'last_seen', ARGV[4], 'owner_url', ARGV[5])
return 1
"""


class RedisSessionStore:
    """Session state in Redis, expiring ``ttl_s`` after the last write."""

    def __init__(self, url: str, ttl_s: int = 3600) -> None:
        self._redis = connect(url)
        self._append = self._redis.register_script(_APPEND)
        self._claim = self._redis.register_script(_CLAIM)
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
            session_id=f["session_id"], owner=f["owner"], owner_url=f.get("owner_url", ""), model=f["model"],
            created=float(f["created"]),
            last_seen=float(f["last_seen"]), micro_turn=int(f["micro_turn"]), state=f["state"],
            config=json.loads(f["config"]), resume_hash=f.get("resume_hash", ""), seed=int(f.get("seed", 0)),
        )

    async def delete(self, session_id: str) -> None:
        try:
            await self._redis.delete(record_key(session_id), log_key(session_id), events_key(session_id),
                                     tasks_key(session_id), worker_key(session_id))
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def append(self, owner: str, entries: list[LogEntry]) -> list[bool]:
        now = str(time.time())
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for e in entries:
                    keys = [record_key(e.session_id), log_key(e.session_id), events_key(e.session_id),
                            tasks_key(e.session_id), worker_key(e.session_id)]
                    args: list[bytes | str | int] = [owner, e.turn, e.context, now, self.ttl_s, len(e.messages),
                                                     *(json.dumps(m) for m in e.messages)]
                    for task_id, count in e.delivered.items():
                        args += [task_id, count]
                    await self._append(keys=keys, args=args, client=pipe)
                results = await pipe.execute()
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [bool(r) for r in results]

    async def history(self, session_id: str) -> tuple[list[tuple[int, bytes]], float | None]:
        try:
            entries: list[Any] = await self._redis.xrange(log_key(session_id)) or []
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        log = [(int(fields[b"turn"]), bytes(fields[b"ctx"])) for _, fields in entries]
        last = int(_text(entries[-1][0]).split("-")[0]) / 1000 if entries else None
        return log, last

    async def messages_after(self, session_id: str, turn: int) -> list[dict[str, Any]]:
        try:
            entries: list[Any] = await self._redis.xrange(events_key(session_id)) or []
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [json.loads(fields[b"msg"]) for _, fields in entries if int(fields[b"turn"]) > turn]

    async def claim(self, session_id: str, old_hash: str, new_hash: str, owner: str, owner_url: str = "") -> bool:
        try:
            return bool(await self._claim(keys=[record_key(session_id)],
                                          args=[old_hash, new_hash, owner, str(time.time()), owner_url]))
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def put_task(self, task: Task) -> None:
        key = tasks_key(task.session_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, task.task_id, task.encode())
                pipe.expire(key, self.ttl_s)
                await pipe.execute()
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def tasks(self, session_id: str) -> tuple[list[Task], dict[str, int]]:
        try:
            raw = await self._redis.hgetall(tasks_key(session_id))
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        tasks, delivered = [], {}
        for k, v in raw.items():
            name = _text(k)
            if name.startswith("delivered:"):
                delivered[name.removeprefix("delivered:")] = int(v)
            else:
                tasks.append(Task.decode(v))
        return sorted(tasks, key=lambda t: t.created), delivered

    async def set_worker(self, session_id: str, worker_id: str) -> None:
        try:
            await self._redis.set(worker_key(session_id), worker_id, ex=self.ttl_s)
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def worker_of(self, session_id: str) -> str | None:
        try:
            value = await self._redis.get(worker_key(session_id))
        except aioredis.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return None if value is None else _text(value)

    async def close(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
