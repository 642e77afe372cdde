"""The online store contract, against real Redis and real SQLite."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from encore.errors import RunFailed
from encore.online import OnlineStore, truncate
from encore.online.redis_store import AsyncRedisReader, RedisOnlineStore
from encore.online.sqlite_store import AsyncSQLiteReader, SQLiteOnlineStore
from tests.redis_cluster import redis_cluster as redis_cluster  # fixtures, imported by name
from tests.redis_cluster import redis_cluster_url as redis_cluster_url


@pytest.fixture(params=["redis", "redis-cluster", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, object]]:
    if request.param == "redis":
        yield "redis", request.getfixturevalue("redis_url")
    elif request.param == "redis-cluster":
        yield "redis-cluster", request.getfixturevalue("redis_cluster_url")
    else:
        yield "sqlite", tmp_path / "online.sqlite3"


def _prefix() -> str:
    return os.environ["ENCORE_REDIS_PREFIX"]  # set by the redis_url fixture


def _store(backend: tuple[str, object]) -> OnlineStore:
    kind, where = backend
    if kind.startswith("redis"):
        return RedisOnlineStore(where, prefix=_prefix(), cluster=kind == "redis-cluster")
    return SQLiteOnlineStore(where)


def _reader(backend: tuple[str, object]):
    kind, where = backend
    if kind.startswith("redis"):
        return AsyncRedisReader(where, prefix=_prefix(), cluster=kind == "redis-cluster")
    return AsyncSQLiteReader(where)


def _write_run(store: OnlineStore, run_id: str, users: dict[int, bytes], **kwargs) -> None:
    store.begin_run(
        run_id,
        model_version=kwargs.get("model", "m1"),
        top_n=3,
        fallback=b"[9,8,7]",
        names={9: "Nine"},
    )
    store.write_batch(run_id, list(users), list(users.values()))


def test_truncate_keeps_json_of_the_first_n_ids() -> None:
    assert truncate(b"[1,22,333,4]", 2) == b"[1,22]"
    assert truncate(b"[1,22,333,4]", 4) == b"[1,22,333,4]"
    assert truncate(b"[1,22,333,4]", 10) == b"[1,22,333,4]"
    assert truncate(b"[5]", 1) == b"[5]"


def test_a_run_is_invisible_until_published(backend) -> None:
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1,2,3]", 2: b"[4,5,6]"})
        assert store.current() is None
        assert store.count("r1") == 2
        store.publish("r1", users_total=2, cold_users=0, grace_seconds=60)
        current = store.current()
        assert current is not None and current.run_id == "r1"
        assert current.model_version == "m1" and current.top_n == 3
        assert current.fallback == b"[9,8,7]" and current.users == 2
        assert store.read("r1", [2, 1, 3]) == [b"[4,5,6]", b"[1,2,3]", None]


def test_publish_refuses_incomplete_coverage_and_keeps_the_old_run(backend) -> None:
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1]"})
        store.publish("r1", users_total=1, cold_users=0, grace_seconds=60)
        _write_run(store, "r2", {1: b"[2]"}, model="m2")
        with pytest.raises(RunFailed, match="holds 1 lists and 0 cold users, but 2 users"):
            store.publish("r2", users_total=2, cold_users=0, grace_seconds=60)
        assert store.current().run_id == "r1"
        store.publish("r2", users_total=3, cold_users=2, grace_seconds=60)  # 1 list + 2 cold
        assert store.current().run_id == "r2"


def test_flip_keeps_the_previous_run_readable_and_rollback_restores_it(backend) -> None:
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1]"})
        store.publish("r1", users_total=1, cold_users=0, grace_seconds=60)
        _write_run(store, "r2", {1: b"[2]"}, model="m2")
        store.publish("r2", users_total=1, cold_users=0, grace_seconds=60)
        assert store.current().run_id == "r2"
        assert store.read("r1", [1]) == [b"[1]"]  # in-flight readers of r1 still get answers
        store.rollback("r1", grace_seconds=60)
        assert store.current().run_id == "r1"
        assert store.read("r2", [1]) == [b"[2]"]


def test_a_replaced_run_expires_after_its_grace_period(backend) -> None:
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1]"})
        store.publish("r1", users_total=1, cold_users=0, grace_seconds=60)
        _write_run(store, "r2", {1: b"[2]"})
        store.publish("r2", users_total=1, cold_users=0, grace_seconds=1)
        _write_run(store, "r3", {1: b"[3]"})
        store.publish("r3", users_total=1, cold_users=0, grace_seconds=1)
        time.sleep(2.2)
        # SQLite purges expired runs when the next run begins; Redis expires the keys itself.
        _write_run(store, "r4", {1: b"[4]"})
        assert store.run_info("r2") is None
        with pytest.raises(RunFailed, match="no longer readable"):
            store.rollback("r2", grace_seconds=60)
        assert store.current().run_id == "r3"


def test_discard_removes_an_unpublished_run(backend) -> None:
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1]"})
        store.discard("r1")
        assert store.run_info("r1") is None
        assert store.read("r1", [1]) == [None]


def test_backfill_writes_into_the_published_run_and_delete_falls_back(backend) -> None:
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1]", 2: b"[2]"})
        store.publish("r1", users_total=2, cold_users=0, grace_seconds=60)
        store.write_batch("r1", [2, 3], [b"[20]", b"[30]"])
        store.delete_users("r1", [1])
        assert store.read("r1", [1, 2, 3]) == [None, b"[20]", b"[30]"]


def test_async_reader_sees_what_the_writer_published(backend) -> None:
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1,2]", 5: b"[3]"})
        store.publish("r1", users_total=2, cold_users=0, grace_seconds=60)

    async def read() -> tuple:
        reader = _reader(backend)
        try:
            await reader.ping()
            current = await reader.current()
            lists = await reader.read(current.run_id, [5, 1, 6])
            names = await reader.names(current.run_id, [9, 10])
            return current.run_id, lists, names
        finally:
            await reader.aclose()

    run_id, lists, names = asyncio.run(read())
    assert run_id == "r1"
    assert lists == [b"[3]", b"[1,2]", None]
    assert names == ["Nine", None]


def _run_keys(client, prefix: str, run_id: str) -> list[str]:
    keys = client.keys(f"{prefix}:run:{run_id}:*") + client.keys(f"{{{prefix}}}:run:{run_id}:*")
    return sorted(key.decode() for key in keys)


def test_redis_run_keys_are_spread_over_buckets_and_expire_while_pending(
    redis_url: str,
) -> None:
    import redis

    prefix = _prefix()
    with RedisOnlineStore(redis_url, prefix=prefix, buckets=4) as store:
        users = [7 * 4096 * n for n in range(1, 41)]  # one block each (ids go by blocks)
        _write_run(store, "r1", {user: b"[1]" for user in users})
        client = redis.Redis.from_url(redis_url)
        keys = _run_keys(client, prefix, "r1")
        assert keys == sorted(
            [f"{{{prefix}}}:run:r1:meta", f"{prefix}:run:r1:names"]
            + [f"{prefix}:run:r1:recs:{b}" for b in range(4)]
        )
        # The metadata shares the pointer's slot; the buckets spread over slots.
        slots = {key: key_slot(key.encode()) for key in keys}
        assert slots[f"{{{prefix}}}:run:r1:meta"] == key_slot(f"{{{prefix}}}:current".encode())
        assert len({slots[f"{prefix}:run:r1:recs:{b}"] for b in range(4)}) == 4
        sizes = [client.hlen(f"{prefix}:run:r1:recs:{b}") - 1 for b in range(4)]
        assert sum(sizes) == 40 and min(sizes) >= 5, sizes  # balanced enough
        assert store.count("r1") == 40
        assert all(0 < client.ttl(k) <= 6 * 3600 for k in keys)  # an abandoned run vanishes
        store.publish("r1", users_total=40, cold_users=0, grace_seconds=60)
        assert all(client.ttl(k) == -1 for k in keys)  # published: kept
        assert client.get(f"{{{prefix}}}:current") == b"r1"


def test_a_pending_run_s_expiry_is_pushed_back_while_it_is_written(redis_url: str) -> None:
    import redis

    prefix = _prefix()
    client = redis.Redis.from_url(redis_url)
    with RedisOnlineStore(redis_url, prefix=prefix, pending_ttl_seconds=600, buckets=8) as store:
        _write_run(store, "r1", {1: b"[1]"})
        keys = _run_keys(client, prefix, "r1")
        assert len(keys) == 10
        for key in keys:
            client.expire(key, 5)  # as if the run had been writing for a long time
        store.write_batch("r1", [2], [b"[2]"])
        # Pushed back every tenth of the TTL, not at every batch.
        assert all(0 < client.ttl(k) <= 5 for k in keys)
        store._pending["r1"] = 0.0  # a tenth of the TTL later
        store.write_batch("r1", [3], [b"[3]"])
        assert all(500 < client.ttl(k) <= 600 for k in keys), {k: client.ttl(k) for k in keys}


def test_a_run_whose_removal_was_cut_short_is_found_and_removed_by_the_sweep(
    redis_url: str,
) -> None:
    import redis

    prefix = _prefix()
    client = redis.Redis.from_url(redis_url)
    with RedisOnlineStore(redis_url, prefix=prefix, buckets=8) as store:
        _write_run(store, "r1", {1: b"[1]", 2: b"[2]"})
        store.publish("r1", users_total=2, cold_users=0, grace_seconds=60)
        _write_run(store, "r2", {1: b"[1]"})
        client.persist(f"{prefix}:run:r2:recs:0")  # as if made permanent by a flip cut short
        client.unlink(f"{{{prefix}}}:run:r2:meta")
        assert {run.run_id: run.published_at for run in store.runs()} == {
            "r1": store.current().published_at,
            "r2": None,
        }
        assert store.discard("r2") is True
        assert _run_keys(client, prefix, "r2") == []
        assert {run.run_id for run in store.runs()} == {"r1"}


def test_publish_again_is_a_no_op_that_still_expires_the_predecessor(backend) -> None:
    """A flip retried after its reply was lost finds `current` moved already: it changes
    nothing, and the predecessor recorded by the first flip still gets its grace period."""
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1]"})
        store.publish("r1", users_total=1, cold_users=0, grace_seconds=60)
        _write_run(store, "r2", {1: b"[2]"})
        store.publish("r2", users_total=1, cold_users=0, grace_seconds=60)
        first = store.current()
        _keep_for_good(backend, store, "r1")  # as if the first flip's second step was lost
        store.publish("r2", users_total=1, cold_users=0, grace_seconds=60)
        assert store.current() == first
        runs = {run.run_id: run for run in store.runs()}
        assert runs["r2"].expires_in is None
        assert 0 < runs["r1"].expires_in <= 60
        store.expire("r1", 10**6)  # NX: r1 expires already, so nothing changes
        assert 0 < {run.run_id: run for run in store.runs()}["r1"].expires_in <= 60


def _keep_for_good(backend, store: OnlineStore, run_id: str) -> None:
    if backend[0].startswith("redis"):
        for key in [store.keys.meta(run_id), *store._data_keys(run_id)]:
            store.client.persist(key)
    else:
        store.conn.execute("UPDATE runs SET expires_at = NULL WHERE run_id = ?", (run_id,))
    assert {run.run_id: run for run in store.runs()}[run_id].expires_in is None


def test_the_served_run_is_never_discarded(backend) -> None:
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1]"})
        store.publish("r1", users_total=1, cold_users=0, grace_seconds=60)
        _write_run(store, "r2", {1: b"[2]"})
        assert store.discard("r1") is False
        assert store.current().run_id == "r1" and store.read("r1", [1]) == [b"[1]"]
        assert store.discard("r2") is True
        assert store.run_info("r2") is None


def test_rollback_keeps_the_first_publication_time(backend) -> None:
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1]"})
        store.publish("r1", users_total=1, cold_users=0, grace_seconds=60)
        published = store.current().published_at
        _write_run(store, "r2", {1: b"[2]"})
        store.publish("r2", users_total=1, cold_users=0, grace_seconds=60)
        time.sleep(0.01)
        info = store.rollback("r1", grace_seconds=60)
        assert store.current().published_at == published == info.published_at
        runs = {run.run_id: run for run in store.runs()}
        assert runs["r1"].expires_in is None and 0 < runs["r2"].expires_in <= 60


def test_runs_lists_every_keyspace_and_expire_sets_only_a_missing_expiry(backend) -> None:
    with _store(backend) as store:
        _write_run(store, "r1", {1: b"[1]"})
        store.publish("r1", users_total=1, cold_users=0, grace_seconds=60)
        _write_run(store, "pending", {1: b"[2]"})
        runs = {run.run_id: run for run in store.runs()}
        assert set(runs) == {"r1", "pending"}
        assert runs["r1"].published_at is not None and runs["r1"].expires_in is None
        assert runs["pending"].published_at is None and runs["pending"].expires_in > 0
        store.expire("r1", 30)
        store.expire("r1", 10**6)
        assert 0 < {run.run_id: run for run in store.runs()}["r1"].expires_in <= 30
        store.discard("pending")
        assert {run.run_id for run in store.runs()} == {"r1"}


def test_buckets_stay_bounded_for_dense_and_sparse_ids() -> None:
    import random
    from collections import Counter

    from encore.online.redis_keys import BLOCK_BITS, bucket_of

    block = 1 << BLOCK_BITS
    # 10 M consecutive ids: 2442 blocks over 1024 buckets, at most 3 blocks (12288 lists).
    dense = Counter(bucket_of(b * block, 1024) for b in range(10_000_000 // block + 1))
    assert max(dense.values()) <= 3
    assert all(bucket_of(b * block + offset, 1024) == bucket_of(b * block, 1024)
               for b in (0, 7, 2441) for offset in (1, block - 1))  # fmt: skip
    # Random 63-bit ids: as even as random placement (mean 195, sd 14).
    rng = random.Random(0)
    sparse = Counter(bucket_of(rng.getrandbits(63), 1024) for _ in range(200_000))
    assert max(sparse.values()) < 1.4 * 200_000 / 1024
