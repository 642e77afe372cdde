"""The quality protocol measured as a user meets it: through a published run and the API.

Fits on the protocol's training split (as `encore evaluate` does), writes that model as a
bundle, publishes a run into the embedded store (`encore run`'s job), reads every test user's
top-10 with POST /v1/recommendations, and scores those lists with the protocol. Also scores
the lists `encore evaluate` scores for the same model, and counts the users whose two lists
differ (0 when what is evaluated is what is served). Prints one JSON line.

    uv run python bench/served_quality.py -i ../shared/data/lastfm-2k/user_artists.dat \\
        --columns user_id,playlist_id,weight
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--interactions", required=True)
    parser.add_argument("--columns", help="names for a header-less file, comma-separated")
    parser.add_argument("--item-candidates", type=int)
    parser.add_argument("--popularity-penalty", type=float)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="encore-served-") as home:
        os.environ["ENCORE_HOME"] = home
        for name in ("ENCORE_REDIS_URL", "ENCORE_DATABASE_URL"):
            os.environ.pop(name, None)
        print(json.dumps(measure(args)), flush=True)


def measure(args: argparse.Namespace) -> dict:
    from fastapi.testclient import TestClient

    from encore.bundle import promote, write_bundle
    from encore.settings import get_settings
    from model_server.app import create_app
    from scheduler.job import run_full
    from training.evaluate import fit_split, recommend_all
    from training.fit import TrainParams
    from training.ingest import read_interactions
    from training.protocol import CUTOFF, list_metrics, ranking_metrics
    from training.train import bundle_contents, model_spec

    columns = args.columns.split(",") if args.columns else None
    overrides = {
        "item_candidates": args.item_candidates,
        "popularity_penalty": args.popularity_penalty,
    }
    params = TrainParams(**{k: v for k, v in overrides.items() if v is not None})
    clock = time.perf_counter()
    split = fit_split(read_interactions(args.interactions, columns=columns), params)
    fit_seconds = time.perf_counter() - clock
    fitted = split.fitted
    settings = get_settings()
    bundle = write_bundle(
        settings.bundles_dir,
        version="protocol-split",
        metadata={"model": model_spec(fitted), "data": {}, "metrics": {}},
        write_contents=bundle_contents(fitted, split.user_ids, split.playlist_ids),
    )
    promote(settings.bundles_dir, bundle.version)
    clock = time.perf_counter()
    record = run_full(settings)
    run_seconds = time.perf_counter() - clock

    tested = np.flatnonzero(np.diff(split.held_indptr) > 0)
    code_of = {int(pid): code for code, pid in enumerate(split.playlist_ids)}
    served = np.full((len(split.user_ids), CUTOFF), -1, dtype=np.int64)
    with TestClient(create_app()) as api:
        for start in range(0, len(tested), 1000):
            codes = tested[start : start + 1000]
            body = api.post(
                "/v1/recommendations",
                json={"user_ids": split.user_ids[codes].tolist(), "n": CUTOFF},
            )
            body.raise_for_status()
            for code, item in zip(codes, body.json()["recommendations"], strict=True):
                listed = [code_of[pid] for pid in item["playlist_ids"]]
                served[code, : len(listed)] = listed
    evaluated = recommend_all(fitted)[:, :CUTOFF]
    n_users = len(split.user_ids)
    figures = {}
    for name, top in (("served", served), ("evaluated", evaluated)):
        accuracy = ranking_metrics(top, split.held_indptr, split.held_items)
        reach = list_metrics(top[tested], fitted.popularity, n_users)
        figures[name] = {
            "recall@10": round(accuracy.recall_at_10, 5),
            "ndcg@10": round(accuracy.ndcg_at_10, 5),
            "coverage@10": round(reach.coverage, 5),
            "top_decile_share@10": round(reach.top_decile_share, 5),
            "novelty@10": round(reach.novelty, 3),
            "users": accuracy.users,
        }
    return {
        "data": str(args.interactions),
        **figures,
        "users_whose_lists_differ": int((served[tested] != evaluated[tested]).any(axis=1).sum()),
        "run_users": record.users_scored,
        "run_cold_users": record.cold_users,
        "chosen": {k: v for k, v in fitted.chosen.items() if not isinstance(v, dict)},
        "fit_seconds": round(fit_seconds, 1),
        "run_seconds": round(run_seconds, 1),
    }


if __name__ == "__main__":
    main()
