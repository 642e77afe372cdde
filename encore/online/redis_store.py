"""Redis backend of the online store (production).

Keys::

    encore:current               the published run id
    encore:run:{id}:meta         hash: model_version, top_n, users, fallback, created_at,
                                 published_at (the first publication), previous (the run
                                 this one replaced, recorded by the flip), challenger (JSON:
                                 the experiment's challenger and share, or empty)
    encore:run:{id}:recs         hash: user id -> JSON bytes of the list
    encore:run:{id}:names        hash: playlist id -> name (the page shows them)

One hash per run makes a batch one HSET, a request one HMGET, and the grace period one
EXPIRE per run rather than one per user. The flip WATCHes ``current`` and the run's keys in
one transaction: on a Redis Cluster those live in different slots, which a cluster refuses,
so this backend needs a single Redis (or a primary with replicas) for now.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import orjson
import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from encore.errors import ONLINE_STORE, RunFailed, StoreUnavailable
from encore.experiments import Challenger
from encore.online.base import AsyncOnlineReader, OnlineStore, RunInfo, StoredRun
from encore.redact import redact

logger = logging.getLogger("encore.online.redis")

# Retried by redis-py itself (a new connection each time): a restart or a dropped socket.
RETRY_ERRORS = [redis.ConnectionError, redis.TimeoutError]
# A Redis that answers with an error is as unavailable as one that does not answer: READONLY
# (a replica, or a failover in progress), OOM (maxmemory reached), MISCONF, LOADING...
# Not retried: they last longer than a request.
UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)


def _unavailable(url: str, what: str, exc: redis.RedisError) -> StoreUnavailable:
    if isinstance(exc, redis.ResponseError):
        # The class names it: redis-py strips READONLY or OOM from the message it keeps.
        problem = f"answered an error ({what}): {type(exc).__name__}: {exc}"
    else:
        problem = f"is unreachable ({what}): {exc}"
    return StoreUnavailable(f"Redis at {redact(url)} {problem}", component=ONLINE_STORE)


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.current = f"{prefix}:current"

    def meta(self, run_id: str) -> str:
        return f"{self.prefix}:run:{{{run_id}}}:meta"

    def recs(self, run_id: str) -> str:
        return f"{self.prefix}:run:{{{run_id}}}:recs"

    def names(self, run_id: str) -> str:
        return f"{self.prefix}:run:{{{run_id}}}:names"

    def all(self, run_id: str) -> tuple[str, str, str]:
        return self.meta(run_id), self.recs(run_id), self.names(run_id)

    def run_of_meta(self, key: bytes) -> str:
        return key.decode()[len(f"{self.prefix}:run:{{") : -len("}:meta")]


def _info(run_id: str, meta: dict[bytes, bytes]) -> RunInfo | None:
    if not meta:
        return None
    published = meta.get(b"published_at")
    return RunInfo(
        run_id=run_id,
        model_version=meta[b"model_version"].decode(),
        top_n=int(meta[b"top_n"]),
        users=int(meta.get(b"users", b"0")),
        fallback=meta[b"fallback"],
        created_at=float(meta[b"created_at"]),
        published_at=float(published) if published else None,
        challenger=Challenger.from_json(orjson.loads(meta[b"challenger"]))
        if meta.get(b"challenger")
        else None,
    )


class RedisOnlineStore(OnlineStore):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "encore",
        socket_timeout: float = 10.0,
        pending_ttl_seconds: int = 6 * 3600,
    ) -> None:
        self.url = url
        self.keys = _Keys(prefix)
        self.pending_ttl_seconds = pending_ttl_seconds
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=5.0,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 3),
            retry_on_error=RETRY_ERRORS,
            health_check_interval=30,
        )
        self._pending: set[str] = set()  # runs this process is writing, not yet published

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UNAVAILABLE as exc:
            raise _unavailable(self.url, what, exc) from exc

    def begin_run(
        self,
        run_id: str,
        *,
        model_version: str,
        top_n: int,
        fallback: bytes,
        names: dict[int, str] | None = None,
        challenger: Challenger | None = None,
    ) -> None:
        meta, recs, names_key = self.keys.all(run_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(meta, recs, names_key)
        pipe.hset(
            meta,
            mapping={
                "model_version": model_version,
                "top_n": top_n,
                "fallback": fallback,
                "created_at": repr(time.time()),
                "users": 0,
                "challenger": orjson.dumps(challenger.as_json()) if challenger else b"",
            },
        )
        if names:
            pipe.hset(names_key, mapping={str(k): v for k, v in names.items()})
        # An abandoned run's keys vanish by themselves; publish() removes the expiry.
        for key in (meta, names_key):
            pipe.expire(key, self.pending_ttl_seconds)
        self._call("begin run", pipe.execute)
        self._pending.add(run_id)

    def write_batch(self, run_id: str, user_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        if not len(user_ids):
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(
            self.keys.recs(run_id), mapping=dict(zip(map(int, user_ids), payloads, strict=True))
        )
        if run_id in self._pending:
            # Every write pushes the expiry of all the run's keys back: a run that is being
            # written never expires, however long it takes; an abandoned one does.
            for key in self.keys.all(run_id):
                pipe.expire(key, self.pending_ttl_seconds)
        self._call("write batch", pipe.execute)

    def delete_users(self, run_id: str, user_ids: Sequence[int]) -> None:
        if len(user_ids):
            self._call("delete", self.client.hdel, self.keys.recs(run_id), *map(int, user_ids))

    def count(self, run_id: str) -> int:
        return int(self._call("count", self.client.hlen, self.keys.recs(run_id)))

    def publish(
        self, run_id: str, *, users_total: int, cold_users: int, grace_seconds: int
    ) -> None:
        meta, recs, names = self.keys.all(run_id)

        def flip(pipe: redis.client.Pipeline) -> None:
            previous = pipe.get(self.keys.current)
            if previous is not None and previous.decode() == run_id:
                return  # a retry after the reply to the flip was lost: it is done
            if not pipe.exists(meta):
                raise RunFailed(f"run {run_id!r} has no keyspace in Redis (expired?)")
            written = pipe.hlen(recs)
            if written + cold_users != users_total:
                raise RunFailed(
                    f"run {run_id!r} holds {written} lists and {cold_users} cold users, "
                    f"but {users_total} users were scored"
                )
            pipe.multi()
            pipe.persist(meta)
            pipe.persist(recs)
            pipe.persist(names)
            pipe.hsetnx(meta, "published_at", repr(time.time()))
            pipe.hset(meta, mapping={"users": written, "previous": previous or b""})
            pipe.set(self.keys.current, run_id)

        # Watching the run's keys too: the count is the one the flip commits with.
        self._call("publish", self.client.transaction, flip, self.keys.current, meta, recs)
        self._pending.discard(run_id)
        self._expire_previous(run_id, grace_seconds)

    def _expire_previous(self, run_id: str, grace_seconds: int) -> None:
        # Reads the predecessor the flip recorded, not `current`: a retried flip that finds
        # `current` already moved still expires the right run. NX keeps a running grace.
        previous = self._call("previous", self.client.hget, self.keys.meta(run_id), "previous")
        if not previous or previous.decode() == run_id:
            return
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys.all(previous.decode()):
            pipe.expire(key, grace_seconds, nx=True)
        self._call("expire previous", pipe.execute)

    def rollback(self, run_id: str, *, grace_seconds: int) -> RunInfo:
        info = self.run_info(run_id)
        if info is None or info.published_at is None:
            raise RunFailed(
                f"run {run_id!r} is no longer readable in Redis (its grace period ended or it "
                "never published); only runs within the grace period can be restored"
            )
        self.publish(run_id, users_total=info.users, cold_users=0, grace_seconds=grace_seconds)
        return info

    def discard(self, run_id: str) -> bool:
        def unlink(pipe: redis.client.Pipeline) -> bool:
            current = pipe.get(self.keys.current)
            if current is not None and current.decode() == run_id:
                return False
            pipe.multi()
            pipe.unlink(*self.keys.all(run_id))
            return True

        removed = self._call(
            "discard", self.client.transaction, unlink, self.keys.current, value_from_callable=True
        )
        self._pending.discard(run_id)
        return removed

    def runs(self) -> list[StoredRun]:
        pattern = self.keys.meta("*")
        found = []
        for key in self._call("scan", lambda: list(self.client.scan_iter(pattern, count=1000))):
            run_id = self.keys.run_of_meta(key)
            pipe = self.client.pipeline(transaction=False)
            pipe.hget(key, "published_at")
            pipe.pttl(key)
            published, ttl = self._call("run", pipe.execute)
            if ttl == -2:
                continue  # expired between the scan and now
            found.append(
                StoredRun(
                    run_id,
                    float(published) if published else None,
                    ttl / 1000 if ttl >= 0 else None,
                )
            )
        return found

    def expire(self, run_id: str, seconds: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys.all(run_id):
            pipe.expire(key, seconds, nx=True)
        self._call("expire", pipe.execute)

    def run_info(self, run_id: str) -> RunInfo | None:
        return _info(run_id, self._call("run info", self.client.hgetall, self.keys.meta(run_id)))

    def current(self) -> RunInfo | None:
        run_id = self._call("current", self.client.get, self.keys.current)
        return self.run_info(run_id.decode()) if run_id else None

    def read(self, run_id: str, user_ids: Sequence[int]) -> list[bytes | None]:
        if not len(user_ids):
            return []
        return self._call("read", self.client.hmget, self.keys.recs(run_id), list(user_ids))

    def ping(self) -> None:
        self._call("ping", self.client.ping)

    def close(self) -> None:
        self.client.close()


class AsyncRedisReader(AsyncOnlineReader):
    def __init__(
        self, url: str, *, prefix: str = "encore", socket_timeout_seconds: float = 1.0
    ) -> None:
        self.url = url
        self.keys = _Keys(prefix)
        # Retried here, not by redis-py: its retry covers the command but not taking a
        # connection from the pool, so a connection a Redis restart closed failed a request
        # once Redis was back. A lost connection is tried 3 times; a timeout is not retried
        # (a Redis that hangs costs a request one timeout), and the answer is a 503.
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_seconds,
            socket_connect_timeout=socket_timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            max_connections=256,
        )

    async def _call(self, what: str, command, *args):
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(3),
                wait=wait_exponential_jitter(multiplier=0.02, max=0.5, jitter=0.02),
                retry=retry_if_exception_type(redis.ConnectionError),
                reraise=True,
            ):
                with attempt:
                    return await command(*args)
        except UNAVAILABLE as exc:
            raise _unavailable(self.url, what, exc) from exc

    async def current(self) -> RunInfo | None:
        run_id = await self._call("current", self.client.get, self.keys.current)
        if not run_id:
            return None
        meta = await self._call("run info", self.client.hgetall, self.keys.meta(run_id.decode()))
        return _info(run_id.decode(), meta)

    async def read(self, run_id: str, user_ids: Sequence[int]) -> list[bytes | None]:
        if not user_ids:
            return []
        return await self._call("read", self.client.hmget, self.keys.recs(run_id), list(user_ids))

    async def names(self, run_id: str, playlist_ids: Sequence[int]) -> list[str | None]:
        if not playlist_ids:
            return []
        raw = await self._call(
            "names", self.client.hmget, self.keys.names(run_id), list(playlist_ids)
        )
        return [value.decode() if value is not None else None for value in raw]

    async def ping(self) -> None:
        await self._call("ping", self.client.ping)

    async def aclose(self) -> None:
        await self.client.aclose()
