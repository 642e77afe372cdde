"""Redis key layout, bucketing and error mapping, shared by the store and the API's reader.

Keys (``P`` the prefix)::

    {P}:current                  the published run id
    {P}:run:<id>:meta            hash: model_version, top_n, users, fallback, created_at,
                                 published_at, previous, challenger, buckets (N)
    P:run:<id>:names             hash: playlist id -> name
    P:run:<id>:recs:<b>          hash, for b in 0..N-1: user id -> JSON bytes of the list,
                                 plus the placeholder field ``_`` (the bucket exists from
                                 begin_run on, with the run's pending expiry)

``{P}`` is a hash tag: the pointer and every run's metadata share one cluster slot, so the
flip can check a run's metadata and move the pointer in one WATCH/MULTI even on a Redis
Cluster. A run's lists are spread over N bucket hashes without a common tag: on a cluster
they spread over the slots (and nodes), and on any Redis no key grows with the user count,
so removing or expiring one never blocks the server for long.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import orjson
import redis
from redis.exceptions import ClusterError, SlotNotCoveredError

from encore.errors import ONLINE_STORE, StoreUnavailable
from encore.experiments import Challenger
from encore.online.base import RunInfo
from encore.redact import redact

# Retried by redis-py itself (a new connection each time): a restart or a dropped socket.
RETRY_ERRORS = [redis.ConnectionError, redis.TimeoutError]
# A Redis that answers with an error is as unavailable as one that does not answer: READONLY
# (a replica, or a failover in progress), OOM (maxmemory reached), MISCONF, LOADING,
# CLUSTERDOWN... Not retried: they last longer than a request.
UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ResponseError,
    ClusterError,
    SlotNotCoveredError,
)
PLACEHOLDER = b"_"  # the field that keeps an empty bucket (and its expiry) in existence
# Ids go to buckets a block of consecutive ids at a time: a batch (consecutive users of the
# bundle's sorted ids) is then an HSET into a few buckets, not one per user. The blocks are
# spread over the buckets by Knuth's multiplicative hash, so buckets stay even however the
# ids are spread, and a bucket holds about users / buckets lists (plus a block or two).
BLOCK_BITS = 12
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def unavailable(url: str, what: str, exc: BaseException) -> StoreUnavailable:
    """The error a caller sees: names the operation and the server, never a password."""
    if isinstance(exc, redis.ResponseError):
        # The class names it: redis-py strips READONLY or OOM from the message it keeps.
        problem = f"answered an error ({what}): {type(exc).__name__}: {exc}"
    else:
        problem = f"is unreachable ({what}): {exc}"
    return StoreUnavailable(redact(f"Redis at {redact(url)} {problem}"), component=ONLINE_STORE)


def bucket_of(user_id: int, buckets: int) -> int:
    """The bucket holding a user's list: stable across processes and releases."""
    return (((int(user_id) >> BLOCK_BITS) * _GOLDEN) & _MASK) * buckets >> 64


def group_by_bucket(user_ids: Iterable[int], buckets: int) -> dict[int, list[int]]:
    """Positions of ``user_ids`` per bucket, in the order asked."""
    groups: dict[int, list[int]] = {}
    for position, user_id in enumerate(user_ids):
        groups.setdefault(bucket_of(user_id, buckets), []).append(position)
    return groups


class Keys:
    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"Redis key prefix {prefix!r} must not hold braces (hash tags)")
        self.prefix = prefix
        self.current = f"{{{prefix}}}:current"

    def meta(self, run_id: str) -> str:
        return f"{{{self.prefix}}}:run:{run_id}:meta"

    def names(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:names"

    def bucket(self, run_id: str, index: int) -> str:
        return f"{self.prefix}:run:{run_id}:recs:{index}"

    def buckets(self, run_id: str, buckets: int) -> list[str]:
        # Highest first: bucket 0 goes last, so a run whose removal was cut short still
        # has it, and the sweep still finds the run (see RedisOnlineStore.runs).
        return [self.bucket(run_id, index) for index in reversed(range(buckets))]

    def data(self, run_id: str, buckets: int) -> list[str]:
        """Every key of a run but its metadata."""
        return [self.names(run_id), *self.buckets(run_id, buckets)]

    # Patterns for SCAN, and the run id back from a key they matched.
    @property
    def meta_pattern(self) -> str:
        return self.meta("*")

    @property
    def first_bucket_pattern(self) -> str:
        return self.bucket("*", 0)

    def run_pattern(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:*"

    def run_of(self, key: bytes) -> str | None:
        text = key.decode()
        for head, tail in (
            (f"{{{self.prefix}}}:run:", ":meta"),
            (f"{self.prefix}:run:", ":recs:0"),
        ):
            if text.startswith(head) and text.endswith(tail):
                run_id = text[len(head) : -len(tail)]
                # The layout before buckets used {id} hash tags: not a run of this layout.
                if run_id and "{" not in run_id and "}" not in run_id:
                    return run_id
        return None


def run_info(run_id: str, meta: dict[bytes, bytes]) -> RunInfo | None:
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


def spread(size: int, groups: dict[int, list[int]], answers: Sequence[list]) -> list:
    """Put the answers of one HMGET per bucket back in the order the ids were asked."""
    out: list = [None] * size
    for positions, answer in zip(groups.values(), answers, strict=True):
        for position, value in zip(positions, answer, strict=True):
            out[position] = value
    return out
