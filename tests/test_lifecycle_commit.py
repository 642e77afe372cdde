"""The run lifecycle around its commit point, on real Redis and Postgres (and the embedded
SQLite where the fault exists there too): the flip is the commit point, so a database failure,
a lost reply or an interruption just after it leaves the new run served and its record right;
and the records are settled afterwards: upkeep reconciles them and sweeps what nothing serves,
a rollback is a run of its own, and queued runs are claimed in order, once."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from encore.database import RunRecord, open_database
from encore.errors import EncoreError, RunLocked, StoreUnavailable
from encore.online import open_online_store
from encore.online.redis_keys import Keys
from encore.settings import Settings
from scheduler.cron import needs_catch_up, upkeep
from scheduler.job import rollback, run_full, run_queued
from tests.conftest import REDIS_URL
from tests.faults import ReplyDroppingProxy, cut_database, restore_database
from tests.lifecycle import USERS, _current, _record, _second_bundle, _served_lists
from tests.lifecycle import servers as servers  # fixtures, imported by name
from tests.lifecycle import settings as settings
from tests.support import publish_random_run

# --------------------------------------------------------------------------------------
# The flip is the commit point
# --------------------------------------------------------------------------------------


def _slow_publish_trigger(database_url: str, seconds: float) -> None:
    """The record's update to published takes ``seconds``: time to cut the database."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f"""
            CREATE FUNCTION slow_publish() RETURNS trigger AS $$
            BEGIN
                IF NEW.status = 'published' AND OLD.status = 'publishing' THEN
                    PERFORM pg_sleep({seconds});
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER slow_publish BEFORE UPDATE ON runs
                FOR EACH ROW EXECUTE FUNCTION slow_publish();
            """
        )


def test_a_database_failure_after_the_flip_keeps_the_new_run_served(servers: Settings) -> None:
    first = publish_random_run(servers, users=USERS)
    _second_bundle(servers)
    _slow_publish_trigger(servers.database_url, 2.0)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(run_full(servers)))
    thread.start()
    deadline = time.monotonic() + 120
    while _current(servers) == first.run_id:
        assert time.monotonic() < deadline and thread.is_alive(), "the run never flipped"
        time.sleep(0.02)
    second = _current(servers)
    # The flip happened; the record's update is under way: the database goes away.
    with _down(servers.database_url):
        time.sleep(1.0)
        assert _current(servers) == second
        assert _served_lists(servers, second) == USERS - USERS // 10
    thread.join(timeout=120)
    assert outcome and outcome[0].run_id == second and outcome[0].status == "published"
    assert _current(servers) == second
    assert _served_lists(servers, second) == USERS - USERS // 10
    record = _record(servers, second)
    assert record.status == "published" and record.error is None
    assert record.published_at is not None and record.finished_at is not None
    assert _record(servers, first.run_id).status == "superseded"


class _down:
    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        cut_database(self.url)

    def __exit__(self, *exc: object) -> None:
        restore_database(self.url)


def test_a_lost_reply_to_the_flip_still_expires_the_predecessor(servers: Settings) -> None:
    first = publish_random_run(servers, users=USERS)
    _second_bundle(servers)
    current_key = Keys(servers.redis_prefix).current.encode()
    where = urlsplit(REDIS_URL)
    proxy = ReplyDroppingProxy(
        where.hostname,
        where.port or 6379,
        drop_after=lambda data: b"EXEC" in data and current_key in data,
    )
    try:
        via_proxy = servers.model_copy(
            update={"redis_url": f"redis://127.0.0.1:{proxy.port}{where.path or '/0'}"}
        )
        second = run_full(via_proxy)
    finally:
        proxy.close()
    assert proxy.dropped.is_set(), "the flip's reply was never dropped"
    assert second.status == "published" and _current(servers) == second.run_id
    client = redis.Redis.from_url(REDIS_URL)
    for key in _run_keys(client, servers.redis_prefix, first.run_id):
        # The metadata at the end of the grace, the lists spread over the next 10 minutes.
        latest = servers.run_grace_seconds + (0 if key.endswith(b":meta") else 600)
        assert 0 < client.ttl(key) <= latest, key
    for key in _run_keys(client, servers.redis_prefix, second.run_id):
        assert client.ttl(key) == -1, key
    assert _record(servers, first.run_id).status == "superseded"


def test_an_interruption_after_the_flip_never_removes_the_served_run(
    servers: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second Ctrl-C (or any exception) after the flip's EXEC, before the run knows it
    landed: the run is served, its record says `publishing`, the next start says published."""
    from encore.online.redis_store import RedisOnlineStore

    first = publish_random_run(servers, users=USERS)
    _second_bundle(servers)

    def interrupted(self, run_id: str, grace_seconds: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(RedisOnlineStore, "_expire_previous", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_full(servers)
    monkeypatch.undo()
    second = _current(servers)
    assert second != first.run_id
    assert _served_lists(servers, second) == USERS - USERS // 10
    assert _record(servers, second).status == "publishing"
    upkeep(servers)
    assert _record(servers, second).status == "published"
    assert _record(servers, first.run_id).status == "superseded"


def test_a_claim_whose_reply_was_lost_is_still_the_runs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from encore.database.postgres import PostgresDatabase
    from encore.database.sqlite import SQLiteDatabase

    publish_random_run(settings, users=USERS)
    with open_database(settings) as db:
        db.enqueue_run(RunRecord("q-lost", "manual", "queued", created_at=datetime.now(UTC)))
    lost = []
    for cls in (SQLiteDatabase, PostgresDatabase):
        original = cls.claim_run

        def claim(self, run_id, original=original, **values):
            claimed = original(self, run_id, **values)
            if not lost:
                lost.append(run_id)
                raise StoreUnavailable("the reply to the claim was lost")
            return claimed

        monkeypatch.setattr(cls, "claim_run", claim)
    record = run_full(settings, run_id="q-lost")
    assert lost == ["q-lost"]
    assert record.status == "published" and _current(settings) == "q-lost"


# --------------------------------------------------------------------------------------
# Reconciliation, the sweep, rollback, the queue
# --------------------------------------------------------------------------------------


def _run_keys(client: redis.Redis, prefix: str, run_id: str) -> list[bytes]:
    """Every key of a run: its metadata (under the pointer's hash tag) and the rest."""
    keys = client.keys(f"{{{prefix}}}:run:{run_id}:*") + client.keys(f"{prefix}:run:{run_id}:*")
    assert keys, f"run {run_id} has no keys"
    return keys


def _keep_for_good(settings: Settings, run_id: str) -> None:
    """Undo a replaced run's expiry, as a flip whose second step was lost would leave it."""
    if settings.redis_url:
        client = redis.Redis.from_url(settings.redis_url)
        for key in _run_keys(client, settings.redis_prefix, run_id):
            client.persist(key)
    else:
        with open_online_store(settings) as store:
            store.conn.execute("UPDATE runs SET expires_at = NULL WHERE run_id = ?", (run_id,))


def test_upkeep_settles_every_record_and_sweeps_what_nothing_serves(settings: Settings) -> None:
    first = publish_random_run(settings, users=USERS)
    _second_bundle(settings)
    second = run_full(settings)
    old = datetime.now(UTC) - timedelta(days=30)
    with open_database(settings) as db, open_online_store(settings) as store:
        # A run whose process died a month ago, behind more than a page of later records.
        db.create_run(
            RunRecord("ghost", "scheduled", "running", created_at=old, owner="gone pid 1")
        )
        for n in range(25):
            db.create_run(RunRecord(f"later-{n:02d}", "manual", "failed", created_at=old))
        store.begin_run("ghost", model_version="m", top_n=3, fallback=b"[1]")
        store.write_batch("ghost", [7], [b"[1]"])
        # The served run recorded as failed (what a database error after the flip once did).
        db.update_run(second.run_id, status="failed", error="error: connection lost")
    _keep_for_good(settings, first.run_id)
    upkeep(settings)
    ghost = _record(settings, "ghost")
    assert ghost.status == "failed" and "gone pid 1" in ghost.error
    assert "stopped before publishing" in ghost.error
    served = _record(settings, second.run_id)
    assert served.status == "published" and served.error is None
    assert _record(settings, first.run_id).status == "superseded"
    with open_online_store(settings) as store:
        runs = {run.run_id: run for run in store.runs()}
    assert set(runs) == {first.run_id, second.run_id}  # the ghost's keyspace is gone
    assert 0 < runs[first.run_id].expires_in <= settings.run_grace_seconds
    assert runs[second.run_id].expires_in is None


def test_rollback_is_a_run_of_its_own_and_keeps_the_targets_history(settings: Settings) -> None:
    first = publish_random_run(settings, users=USERS)
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    with open_database(settings) as db:
        db.update_run(first.run_id, finished_at=two_days_ago, published_at=two_days_ago)
    _second_bundle(settings)
    second = run_full(settings)
    assert not needs_catch_up(settings)
    record = rollback(settings, first.run_id)
    assert (record.kind, record.status, record.target_run_id) == (
        "rollback",
        "published",
        first.run_id,
    )
    assert record.model_version == "random-v1"
    target = _record(settings, first.run_id)
    assert target.status == "published"
    assert target.finished_at == two_days_ago and target.published_at == two_days_ago
    assert _record(settings, second.run_id).status == "superseded"
    assert _current(settings) == first.run_id
    assert needs_catch_up(settings)  # the served data is two days old, and says so
    with pytest.raises(EncoreError, match="already the one served"):
        rollback(settings, first.run_id)


def test_queued_runs_are_claimed_in_order_once(settings: Settings) -> None:
    first = publish_random_run(settings, users=USERS)
    now = datetime.now(UTC)
    with open_database(settings) as db:
        db.enqueue_run(RunRecord("q1-backfill", "backfill", "queued", created_at=now), [14, 21])
        db.enqueue_run(
            RunRecord("q2-full", "manual", "queued", created_at=now + timedelta(seconds=1))
        )
        with db.run_lock("someone-else"), pytest.raises(RunLocked):
            run_full(settings, run_id="q1-backfill")
        assert db.get_run("q1-backfill").status == "queued"  # refused, still queued
    done = run_queued(settings)
    assert [r.run_id for r in done] == ["q1-backfill", "q2-full"]
    backfill = _record(settings, "q1-backfill")
    assert backfill.status == "published" and backfill.target_run_id == first.run_id
    assert backfill.users_total == 2
    assert _current(settings) == "q2-full"
    assert run_queued(settings) == []
    with pytest.raises(EncoreError, match="not queued"):
        run_full(settings, run_id="q2-full")
