"""Redis backend of the online store (production): one Redis, or a Redis Cluster.

The key layout is in :mod:`encore.online.redis_keys`. One code path serves both: a batch is
one pipeline of an HSET per bucket it touches, a read one HMGET per bucket (redis-py's cluster
pipeline groups them by node). The flip counts the lists bucket by bucket, makes the buckets
permanent, then WATCHes ``current`` and the run's metadata (one slot: the ``{prefix}`` hash
tag) and, in one MULTI, moves the pointer. Removal is UNLINK: the server frees the memory in
a background thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import orjson
import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from encore.errors import RunFailed
from encore.experiments import Challenger
from encore.online.base import OnlineStore, RunInfo, StoredRun
from encore.online.redis_keys import (
    PLACEHOLDER,
    RETRY_ERRORS,
    UNAVAILABLE,
    Keys,
    group_by_bucket,
    run_info,
    spread,
    unavailable,
)
from encore.online.redis_reader import AsyncRedisReader

__all__ = ["AsyncRedisReader", "RedisOnlineStore"]

logger = logging.getLogger("encore.online.redis")


def connect(url: str, *, cluster: bool, socket_timeout: float):
    options = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5.0,
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), 3),
        "health_check_interval": 30,
    }
    if cluster:
        try:
            # Connects to the node in the URL and learns the others (and the slots) from it.
            return RedisCluster.from_url(url, **options)
        except (RedisClusterException, *UNAVAILABLE) as exc:
            raise unavailable(url, "cluster discovery", exc) from exc
    return redis.Redis.from_url(url, retry_on_error=RETRY_ERRORS, **options)


class RedisOnlineStore(OnlineStore):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "encore",
        socket_timeout: float = 10.0,
        pending_ttl_seconds: int = 6 * 3600,
        cluster: bool = False,
        buckets: int = 1024,
        expiry_spread_seconds: float = 600.0,
    ) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self.pending_ttl_seconds = pending_ttl_seconds
        self.buckets = buckets  # for the runs this process begins; a run's own is in its meta
        self.expiry_spread_seconds = expiry_spread_seconds
        self.client = connect(url, cluster=cluster, socket_timeout=socket_timeout)
        # Runs this process is writing, not yet published -> when their expiry is next pushed
        # back (monotonic seconds).
        self._pending: dict[str, float] = {}
        self._buckets: dict[str, int] = {}  # run id -> its bucket count, once read

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UNAVAILABLE as exc:
            raise unavailable(self.url, what, exc) from exc

    def _run(self, what: str, commands) -> list:
        """One non-transactional pipeline: ``commands(pipe)`` queues, then it is sent."""
        pipe = self.client.pipeline(transaction=False)
        commands(pipe)
        return self._call(what, pipe.execute)

    def _buckets_of(self, run_id: str) -> int | None:
        if run_id not in self._buckets:
            found = self._call("run info", self.client.hget, self.keys.meta(run_id), "buckets")
            if found is None:
                return None
            self._buckets[run_id] = int(found)
        return self._buckets[run_id]

    def _data_keys(self, run_id: str) -> list[str]:
        """A run's keys but its metadata: from the bucket count in the metadata, or, once
        that is gone (a removal cut short), whatever keys are left under the run's name."""
        buckets = self._buckets_of(run_id)
        if buckets is not None:
            return self.keys.data(run_id, buckets)
        pattern = self.keys.run_pattern(run_id)
        return self._call("scan", lambda: list(self.client.scan_iter(pattern, count=1000)))

    def _unlink(self, what: str, keys: Sequence) -> None:
        # One key per command: a cluster refuses a multi-key UNLINK across slots.
        self._run(what, lambda pipe: [pipe.unlink(key) for key in keys])

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
        meta = self.keys.meta(run_id)
        self._buckets.pop(run_id, None)
        old = self._buckets_of(run_id)
        if old is not None:  # a run id begun again
            self._unlink("begin run", [meta, *self.keys.data(run_id, old)])
        self._buckets[run_id] = self.buckets
        ttl = self.pending_ttl_seconds

        def create(pipe) -> None:
            # Every bucket exists from now on, expiring: a write (from any process) into an
            # existing hash keeps its expiry, so an abandoned run never leaves a key behind.
            for key in self.keys.buckets(run_id, self.buckets):
                pipe.hset(key, PLACEHOLDER, b"")
                pipe.expire(key, ttl)
            if names:
                pipe.hset(self.keys.names(run_id), mapping={str(k): v for k, v in names.items()})
                pipe.expire(self.keys.names(run_id), ttl)
            # The metadata last: a run is found by its metadata or its bucket 0.
            pipe.hset(
                meta,
                mapping={
                    "model_version": model_version,
                    "top_n": top_n,
                    "fallback": fallback,
                    "created_at": repr(time.time()),
                    "users": 0,
                    "buckets": self.buckets,
                    "challenger": orjson.dumps(challenger.as_json()) if challenger else b"",
                },
            )
            pipe.expire(meta, ttl)

        self._run("begin run", create)
        self._pending[run_id] = time.monotonic() + ttl / 10

    def write_batch(self, run_id: str, user_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        if not len(user_ids):
            return
        buckets = self._buckets_of(run_id)
        if buckets is None:
            raise RunFailed(f"run {run_id!r} has no keyspace in Redis (expired?)")
        ids = [int(user_id) for user_id in user_ids]
        groups = group_by_bucket(ids, buckets)
        refresh_at = self._pending.get(run_id)
        refresh = refresh_at is not None and time.monotonic() >= refresh_at

        def write(pipe) -> None:
            for bucket, positions in groups.items():
                pipe.hset(
                    self.keys.bucket(run_id, bucket),
                    mapping={ids[p]: payloads[p] for p in positions},
                )
            if refresh:
                # A run that is being written never expires, however long it takes; an
                # abandoned one does. Pushed back every tenth of the TTL, not at every batch:
                # the buckets keep the expiry they were created with.
                for key in (self.keys.meta(run_id), *self.keys.data(run_id, buckets)):
                    pipe.expire(key, self.pending_ttl_seconds)

        self._run("write batch", write)
        if refresh:
            self._pending[run_id] = time.monotonic() + self.pending_ttl_seconds / 10

    def delete_users(self, run_id: str, user_ids: Sequence[int]) -> None:
        buckets = self._buckets_of(run_id) if len(user_ids) else None
        if buckets is None:
            return
        ids = [int(user_id) for user_id in user_ids]
        groups = group_by_bucket(ids, buckets)
        self._run(
            "delete",
            lambda pipe: [
                pipe.hdel(self.keys.bucket(run_id, b), *(ids[p] for p in ps))
                for b, ps in groups.items()
            ],
        )

    def count(self, run_id: str) -> int:
        buckets = self._buckets_of(run_id)
        if buckets is None:
            return 0
        keys = self.keys.buckets(run_id, buckets)
        lengths = self._run("count", lambda pipe: [pipe.hlen(key) for key in keys])
        return sum(max(length - 1, 0) for length in lengths)  # but the placeholders

    def publish(
        self, run_id: str, *, users_total: int, cold_users: int, grace_seconds: int
    ) -> None:
        current = self._call("current", self.client.get, self.keys.current)
        if current is None or current.decode() != run_id:
            self._verify_and_flip(run_id, users_total=users_total, cold_users=cold_users)
        # else: a retry after the reply to the flip was lost: it is done
        self._pending.pop(run_id, None)
        self._expire_previous(run_id, grace_seconds)

    def _verify_and_flip(self, run_id: str, *, users_total: int, cold_users: int) -> None:
        meta = self.keys.meta(run_id)
        self._buckets.pop(run_id, None)  # read again: the metadata may be gone
        if self._buckets_of(run_id) is None:
            raise RunFailed(f"run {run_id!r} has no keyspace in Redis (expired?)")
        # Counted before the flip, bucket by bucket (they live in other slots): only this
        # run's own process writes into a run that is not published yet.
        written = self.count(run_id)
        if written + cold_users != users_total:
            raise RunFailed(
                f"run {run_id!r} holds {written} lists and {cold_users} cold users, "
                f"but {users_total} users were scored"
            )
        # Permanent before the flip, so the served run never has a key that expires. If the
        # process dies before the flip, its metadata still expires, and the sweep finds the
        # rest by its bucket 0 (see runs()).
        data = self.keys.data(run_id, self._buckets[run_id])
        self._run("publish", lambda pipe: [pipe.persist(key) for key in data])

        def flip(pipe) -> None:
            previous = pipe.get(self.keys.current)
            if previous is not None and previous.decode() == run_id:
                return  # flipped by another attempt in the meantime
            # The metadata is the run's token: discard() removes it in a transaction that
            # checks `current`, and this one checks it is still there; so a run is never
            # published while it is being removed, nor removed once published.
            if not pipe.exists(meta):
                raise RunFailed(f"run {run_id!r} has no keyspace in Redis (expired?)")
            pipe.multi()
            pipe.persist(meta)
            pipe.hsetnx(meta, "published_at", repr(time.time()))
            pipe.hset(meta, mapping={"users": written, "previous": previous or b""})
            pipe.set(self.keys.current, run_id)

        try:
            self._call("publish", self.client.transaction, flip, self.keys.current, meta)
        except RunFailed:
            self._unlink("discard", data)  # made permanent above: nothing would expire them
            raise

    def _expire_previous(self, run_id: str, grace_seconds: int) -> None:
        # Reads the predecessor the flip recorded, not `current`: a retried flip that finds
        # `current` already moved still expires the right run. NX keeps a running grace.
        previous = self._call("previous", self.client.hget, self.keys.meta(run_id), "previous")
        if previous and previous.decode() != run_id:
            self.expire(previous.decode(), grace_seconds)

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
        meta = self.keys.meta(run_id)
        data = self._data_keys(run_id)

        def unlink(pipe) -> bool:
            current = pipe.get(self.keys.current)
            if current is not None and current.decode() == run_id:
                return False
            pipe.multi()
            pipe.unlink(meta)
            return True

        removed = self._call(
            "discard", self.client.transaction, unlink, self.keys.current, meta,
            value_from_callable=True,
        )  # fmt: skip
        if removed:
            # The metadata is gone: the run can no longer be published; the rest follows.
            self._unlink("discard", data)
            self._buckets.pop(run_id, None)
        self._pending.pop(run_id, None)
        return removed

    def runs(self) -> list[StoredRun]:
        found: dict[str, StoredRun] = {}
        for pattern in (self.keys.meta_pattern, self.keys.first_bucket_pattern):
            keys = self._call("scan", lambda p=pattern: list(self.client.scan_iter(p, count=1000)))
            for key in keys:
                run_id = self.keys.run_of(key)
                if run_id is None or run_id in found:
                    continue
                pipe = self.client.pipeline(transaction=False)
                pipe.hget(self.keys.meta(run_id), "published_at")
                pipe.pttl(key)
                published, ttl = self._call("run", pipe.execute)
                if ttl == -2:
                    continue  # expired between the scan and now
                # Without metadata (a removal or a flip cut short) a run is not published:
                # the sweep removes what is left of it.
                found[run_id] = StoredRun(
                    run_id,
                    float(published) if published else None,
                    ttl / 1000 if ttl >= 0 else None,
                )
        return list(found.values())

    def expire(self, run_id: str, seconds: int) -> None:
        # The metadata at `seconds` (the run is gone for readers and rollback at once), the
        # other keys spread over the next `expiry_spread_seconds`: a server without
        # lazyfree-lazy-expire frees an expired key in the foreground, and a thousand buckets
        # expiring in the same instant would hold it for their sum in one expiry cycle.
        data = self._data_keys(run_id)
        step = self.expiry_spread_seconds * 1000 / max(len(data), 1)

        def expire(pipe) -> None:
            pipe.expire(self.keys.meta(run_id), seconds, nx=True)
            for index, key in enumerate(data):
                pipe.pexpire(key, seconds * 1000 + round(index * step), nx=True)

        self._run("expire", expire)

    def run_info(self, run_id: str) -> RunInfo | None:
        return run_info(run_id, self._call("run info", self.client.hgetall, self.keys.meta(run_id)))

    def current(self) -> RunInfo | None:
        run_id = self._call("current", self.client.get, self.keys.current)
        return self.run_info(run_id.decode()) if run_id else None

    def read(self, run_id: str, user_ids: Sequence[int]) -> list[bytes | None]:
        if not len(user_ids):
            return []
        buckets = self._buckets_of(run_id)
        if buckets is None:
            return [None] * len(user_ids)
        ids = [int(user_id) for user_id in user_ids]
        groups = group_by_bucket(ids, buckets)
        answers = self._run(
            "read",
            lambda pipe: [
                pipe.hmget(self.keys.bucket(run_id, b), [ids[p] for p in ps])
                for b, ps in groups.items()
            ],
        )
        return spread(len(ids), groups, answers)

    def ping(self) -> None:
        self._call("ping", self.client.ping)

    def close(self) -> None:
        self.client.close()
