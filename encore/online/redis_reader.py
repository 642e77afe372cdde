"""The API's read side of the Redis online store (one Redis or a Redis Cluster)."""

from __future__ import annotations

from collections.abc import Sequence

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from encore.online.base import AsyncOnlineReader, RunInfo
from encore.online.redis_keys import (
    UNAVAILABLE,
    Keys,
    group_by_bucket,
    run_info,
    spread,
    unavailable,
)

_KNOWN_RUNS = 8  # bucket counts remembered: the current run, and those being replaced

# One round trip and one command for a request's ids however many buckets they fall in: a
# pipeline of one HMGET per bucket costs the API a command per bucket (10 ids, ~10 commands).
# KEYS are the buckets; ARGV holds, for each, how many ids follow, then the ids. no-writes:
# allowed on a read-only replica. A cluster spreads the buckets over slots, where a script
# cannot reach: there the reads stay pipelined (grouped by node by the cluster client).
READ_BUCKETS = """#!lua flags=no-writes
local out, at = {}, 1
for _, key in ipairs(KEYS) do
    local n = tonumber(ARGV[at])
    local values = redis.call('HMGET', key, unpack(ARGV, at + 1, at + n))
    for i = 1, n do out[#out + 1] = values[i] end
    at = at + n + 1
end
return out
"""


class AsyncRedisReader(AsyncOnlineReader):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "encore",
        socket_timeout_seconds: float = 1.0,
        cluster: bool = False,
    ) -> None:
        self.url = url
        self.keys = Keys(prefix)
        # Retried here, not by redis-py: its retry covers the command but not taking a
        # connection from the pool, so a connection a Redis restart closed failed a request
        # once Redis was back. A lost connection is tried 3 times; a timeout is not retried
        # (a Redis that hangs costs a request one timeout), and the answer is a 503.
        options = {
            "socket_timeout": socket_timeout_seconds,
            "socket_connect_timeout": socket_timeout_seconds,
            "retry": Retry(NoBackoff(), 0),
            "max_connections": 256,  # per node on a cluster
        }
        # The cluster client learns the nodes and slots at its first command, not here.
        self.client = (
            AsyncRedisCluster.from_url(url, **options)
            if cluster
            else aioredis.Redis.from_url(url, **options)
        )
        self._buckets: dict[str, int] = {}
        # Redis before 7.0 knows no script flags: it reads with the pipeline, as a cluster does.
        self._script = None if cluster else self.client.register_script(READ_BUCKETS)

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
            raise unavailable(self.url, what, exc) from exc

    def _remember(self, run_id: str, buckets: int) -> None:
        if run_id not in self._buckets and len(self._buckets) >= _KNOWN_RUNS:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[run_id] = buckets

    async def current(self) -> RunInfo | None:
        run_id = await self._call("current", self.client.get, self.keys.current)
        if not run_id:
            return None
        meta = await self._call("run info", self.client.hgetall, self.keys.meta(run_id.decode()))
        if meta.get(b"buckets"):
            self._remember(run_id.decode(), int(meta[b"buckets"]))
        return run_info(run_id.decode(), meta)

    async def read(self, run_id: str, user_ids: Sequence[int]) -> list[bytes | None]:
        if not user_ids:
            return []
        buckets = self._buckets.get(run_id)
        if buckets is None:
            found = await self._call(
                "run info", self.client.hget, self.keys.meta(run_id), "buckets"
            )
            if found is None:
                return [None] * len(user_ids)  # the run is gone: everyone reads the fallback
            buckets = int(found)
            self._remember(run_id, buckets)
        ids = [int(user_id) for user_id in user_ids]
        groups = group_by_bucket(ids, buckets)
        if len(groups) == 1:
            (bucket,) = groups
            return await self._call(
                "read", self.client.hmget, self.keys.bucket(run_id, bucket), ids
            )

        if self._script is not None:
            try:
                return await self._scripted(run_id, ids, groups)
            except redis.ResponseError as exc:
                if "flags" not in str(exc) and "shebang" not in str(exc).lower():
                    raise
                self._script = None

        async def pipelined() -> list:
            pipe = self.client.pipeline(transaction=False)
            for bucket, positions in groups.items():
                pipe.hmget(self.keys.bucket(run_id, bucket), [ids[p] for p in positions])
            return await pipe.execute()

        return spread(len(ids), groups, await self._call("read", pipelined))

    async def _scripted(
        self, run_id: str, ids: list[int], groups: dict[int, list[int]]
    ) -> list[bytes | None]:
        keys, args = [], []
        for bucket, positions in groups.items():
            keys.append(self.keys.bucket(run_id, bucket))
            args.append(len(positions))
            args.extend(ids[p] for p in positions)
        assert self._script is not None
        flat = await self._call("read", self._script, keys, args)
        answers, at = [], 0
        for positions in groups.values():
            answers.append(flat[at : at + len(positions)])
            at += len(positions)
        return spread(len(ids), groups, answers)

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
