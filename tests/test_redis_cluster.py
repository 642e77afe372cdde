"""End to end on a real three-master Redis Cluster: the nightly run publishes, the API serves,
a second run replaces the first, the sweep and rollback work, and a run spreads over nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis.cluster import RedisCluster

from encore.bundle import promote
from encore.online import open_online_store
from encore.settings import Settings, get_settings
from model_server.app import create_app
from scheduler.job import rollback, run_full
from tests.random_bundle import build_random_bundle
from tests.redis_cluster import redis_cluster as redis_cluster  # fixtures, imported by name
from tests.redis_cluster import redis_cluster_url as redis_cluster_url
from tests.support import publish_random_run

pytestmark = pytest.mark.integration

USERS = 300


@pytest.fixture
def settings(redis_cluster_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ENCORE_REDIS_URL", redis_cluster_url)
    monkeypatch.setenv("ENCORE_REDIS_BUCKETS", "64")
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.redis_cluster and settings.redis_buckets == 64
    return settings


def test_a_run_publishes_on_a_cluster_and_the_api_serves_it(settings: Settings) -> None:
    record = publish_random_run(settings, users=USERS)
    assert record.status == "published"
    with open_online_store(settings) as store:
        assert store.current().run_id == record.run_id
        assert store.count(record.run_id) == USERS - USERS // 10
        stored = store.read(record.run_id, [14, 7, 21])
    # The run's keys live on every master, not in one slot.
    client = RedisCluster.from_url(settings.redis_url)
    try:
        owners = {
            client.get_node_from_key(key).name
            for key in client.scan_iter(f"{settings.redis_prefix}:run:{record.run_id}:*")
        }
        assert len(owners) == 3, owners
    finally:
        client.close()

    with TestClient(create_app()) as api:
        assert api.get("/readyz").status_code == 200
        response = api.post("/v1/recommendations", json={"user_ids": [14, 7, 21]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["run_id"] == record.run_id
        items = body["recommendations"]
        assert [item["source"] for item in items] == ["batch", "fallback", "batch"]
        assert items[0]["playlist_ids"] == json.loads(stored[0])[:10]
        assert items[2]["playlist_ids"] == json.loads(stored[2])[:10]


def test_a_second_run_replaces_the_first_and_rollback_restores_it(settings: Settings) -> None:
    first = publish_random_run(settings, users=USERS)
    build_random_bundle(
        settings.bundles_dir, users=USERS, playlists=120, candidates=20, dim=16,
        cold_every=10, version="random-v2", seed=1,
    )  # fmt: skip
    promote(settings.bundles_dir, "random-v2")
    second = run_full(settings)
    assert second.status == "published"
    with open_online_store(settings) as store:
        runs = {run.run_id: run for run in store.runs()}
        assert runs[second.run_id].expires_in is None
        assert 0 < runs[first.run_id].expires_in <= settings.run_grace_seconds
        assert store.discard(second.run_id) is False  # the served run stays
    record = rollback(settings, first.run_id)
    assert record.status == "published"
    with open_online_store(settings) as store:
        assert store.current().run_id == first.run_id
        assert store.count(first.run_id) == USERS - USERS // 10
    with TestClient(create_app()) as api:
        response = api.post("/v1/recommendations", json={"user_ids": [14]})
        assert response.status_code == 200 and response.json()["run_id"] == first.run_id
