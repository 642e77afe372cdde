"""The API against a Redis that fails for real: restarted under reads, cut off from its master
(read-only, then refusing reads), out of memory, or refusing to read the current run.

A private redis-server (tests/redis_server.py) holds one published run for the module; each
test leaves it as it found it. Recommendations are answered 200 or a JSON 503, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from encore.database.sqlite import AsyncSQLiteDatabase
from encore.errors import StoreUnavailable
from encore.online import open_online_store
from encore.online.redis_store import AsyncRedisReader
from encore.settings import Settings
from model_server.app import create_app
from model_server.state import ServingState
from tests.api_support import Backend, sample, use_backend
from tests.live import live_server
from tests.load import Answer, Load, request
from tests.redis_server import PrivateRedis, _free_port, private_redis
from tests.support import publish_random_run

pytestmark = pytest.mark.integration

ASKED = {"user_ids": [14, 21, 7, 5]}


@pytest.fixture(scope="module")
def redis_run(tmp_path_factory) -> Iterator[tuple[PrivateRedis, Backend]]:
    directory = tmp_path_factory.mktemp("private-redis")
    with private_redis(directory) as server:
        settings = Settings(
            home=directory / "home", redis_url=server.url, workers=2, _env_file=None
        )
        record = publish_random_run(settings)
        with open_online_store(settings) as store:
            run = store.current()
        yield server, Backend("redis", settings, record, run)


def _is_json_503(answer: Answer) -> bool:
    if answer.status != 503 or not answer.content_type.startswith("application/json"):
        return False
    body = answer.json()
    return body.get("component") == "online_store" and int(answer.retry_after) >= 1


@pytest.mark.slow
def test_a_redis_restart_under_reads_is_503s_then_200s_never_a_500(redis_run, monkeypatch):
    server, backend = redis_run
    use_backend(monkeypatch, backend)
    body = json.dumps(ASKED).encode()
    with live_server(create_app()) as url:

        def send() -> Answer:
            return request("POST", f"{url}/v1/recommendations", body)

        with Load(send, threads=4) as load:
            load.wait_for(lambda a: a.status == 200, count=40, since=0)
            server.stop()
            down = load.mark()
            load.wait_for(lambda a: a.status == 503, count=40, since=down)
            server.start()
            up = load.mark()
            load.wait_for(lambda a: a.status == 200, count=200, since=up)
        answers = load.answers

    statuses = Counter(a.status for a in answers)
    print(f"redis restart under reads: {dict(statuses)} over {len(answers)} requests")
    assert set(statuses) <= {200, 503}, statuses  # no 500, and never a dropped connection
    refused = [a for a in answers if a.status == 503]
    assert refused and all(_is_json_503(a) for a in refused), refused[:3]
    assert all(backend.record.run_id in a.body.decode() for a in answers if a.status == 200)
    # Once answers came back, they stayed back: the reader's connections were renewed. (A
    # request sent while Redis was still down may finish after one sent later: go by when
    # each was sent.)
    back = min(a.finished for a in answers[up:] if a.status == 200)
    after = Counter(a.status for a in answers if a.started > back)
    late = [
        (a.body[:200], round(a.started - back, 3))
        for a in answers
        if a.started > back and a.status != 200
    ][:3]
    assert after == {200: sum(after.values())} and after[200] >= 100, (after, late)


def test_a_replica_cut_off_from_its_master_is_503_and_read_only(redis_run, monkeypatch):
    server, backend = redis_run
    use_backend(monkeypatch, backend)
    admin = server.client()
    run_id = backend.record.run_id
    with TestClient(create_app()) as api:
        assert api.post("/v1/recommendations", json=ASKED).status_code == 200
        admin.replicaof("127.0.0.1", _free_port())  # a master that is not there
        try:
            # Serving stale data (Redis' default): reads go on, writes are refused.
            assert api.post("/v1/recommendations", json=ASKED).status_code == 200
            with (
                open_online_store(backend.settings) as store,
                pytest.raises(StoreUnavailable, match="ReadOnlyError") as raised,
            ):
                store.delete_users(run_id, [14])
            assert raised.value.component == "online_store"
            # Refusing stale reads: MASTERDOWN on every read.
            admin.config_set("replica-serve-stale-data", "no")
            for response in (
                api.post("/v1/recommendations", json=ASKED),
                api.get("/v1/recommendations/14"),
                api.get("/v1/playlists?ids=1,2"),
            ):
                assert response.status_code == 503, response.text
                assert response.json()["component"] == "online_store"
                assert int(response.headers["retry-after"]) >= 1
            ready = api.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["checks"]["online_store"]["ok"] is False
        finally:
            admin.config_set("replica-serve-stale-data", "yes")
            admin.replicaof("NO", "ONE")
        assert api.post("/v1/recommendations", json=ASKED).status_code == 200
        assert api.get("/readyz").status_code == 200
    admin.close()


def test_a_redis_out_of_memory_is_store_unavailable(redis_run):
    server, backend = redis_run
    admin = server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")  # bytes: every write that could grow memory is refused
    try:
        with (
            open_online_store(backend.settings) as store,
            pytest.raises(StoreUnavailable, match="OutOfMemoryError") as raised,
        ):
            store._call("write", store.client.set, "encore:oom-probe", "x")
        assert raised.value.component == "online_store"
        assert "answered an error" in str(raised.value)
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()


def test_the_current_run_is_read_once_for_many_concurrent_requests(redis_run):
    server, backend = redis_run
    admin = server.client()
    settings = backend.settings.model_copy(update={"run_cache_seconds": 0.0})

    def reads() -> tuple[int, int]:
        stats = admin.info("commandstats")
        return (
            stats.get("cmdstat_get", {}).get("calls", 0),
            stats.get("cmdstat_hgetall", {}).get("calls", 0),
        )

    async def scenario() -> None:
        reader = AsyncRedisReader(server.url)
        state = ServingState(settings, reader, AsyncSQLiteDatabase(settings.sqlite_database_path))
        try:
            # No run known yet: everyone waits for the one read.
            admin.config_resetstat()
            runs = await asyncio.gather(*(state.current_run() for _ in range(50)))
            assert {run.run_id for run in runs} == {backend.record.run_id}
            assert reads() == (1, 1)
            # A run known and the view stale again: one read, the others use the known run.
            admin.config_resetstat()
            runs = await asyncio.gather(*(state.current_run() for _ in range(50)))
            assert {run.run_id for run in runs} == {backend.record.run_id}
            assert reads() == (1, 1)
        finally:
            await reader.aclose()

    try:
        asyncio.run(scenario())
    finally:
        admin.close()


def test_the_last_known_run_is_served_when_the_current_run_cannot_be_read(
    redis_run, monkeypatch, caplog
):
    server, backend = redis_run
    use_backend(monkeypatch, backend, ENCORE_RUN_CACHE_SECONDS="0")
    admin = server.client()
    failures = "encore_run_refresh_failures_total"
    with TestClient(create_app()) as api:
        assert api.post("/v1/recommendations", json=ASKED).status_code == 200  # run known
        before = sample(failures)
        # The server refuses the reads of the current run (an ACL), not the lists' reads.
        admin.execute_command("ACL", "SETUSER", "default", "-get", "-hgetall")
        try:
            with caplog.at_level(logging.WARNING, logger="encore.api"):
                for _ in range(5):
                    response = api.post("/v1/recommendations", json=ASKED)
                    assert response.status_code == 200, response.text
                    assert response.json()["run_id"] == backend.record.run_id
            assert sample(failures) == before + 5
            warned = [r for r in caplog.records if "cannot read the current run" in r.message]
            assert len(warned) == 1, caplog.text  # once per failing streak, not per request
            # An API that never knew a run has nothing to fall back on.
            with TestClient(create_app()) as fresh:
                refused = fresh.post("/v1/recommendations", json=ASKED)
                assert refused.status_code == 503, refused.text
                assert refused.json()["component"] == "online_store"
        finally:
            admin.execute_command("ACL", "SETUSER", "default", "+get", "+hgetall")
        with caplog.at_level(logging.INFO, logger="encore.api"):
            assert api.post("/v1/recommendations", json=ASKED).status_code == 200
        assert "readable again" in caplog.text
        assert sample(failures) == before + 5
    admin.close()
