"""Benchmark of the item-KNN fit (the item model above ``ease_max_items``): its blocks on every
worker thread against the same blocks on one, in the same run. Prints one JSON line.

    uv run python bench/items.py --users 1000000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairing import cached_data, default_playlists


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--playlists", type=int, default=None)
    parser.add_argument("--neighbours", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2, help="alternated runs of each")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "encore-bench")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    playlists = args.playlists or default_playlists(args.users)

    from training.ann import worker_threads
    from training.ingest import read_interactions
    from training.items import ItemParams, _Basis, knn_weights
    from training.matrix import encode, interaction_matrix

    path = cached_data(args.cache, args.users, playlists, args.seed)
    rows = read_interactions(path)
    users, user_codes = encode(rows.user_ids)
    items, item_codes = encode(rows.playlist_ids)
    matrix = interaction_matrix(user_codes, item_codes, rows.weights, (len(users), len(items)))
    del rows
    # The playlists and binary columns the training's item-KNN is fitted on.
    binary = _Basis.of(matrix, ItemParams(method="knn")).binary
    threads = worker_threads()
    times: dict[int, list[float]] = {1: [], threads: []}
    results = {}
    for _ in range(args.repeat):
        for workers in times:
            clock = time.perf_counter()
            results[workers] = knn_weights(binary, args.neighbours, workers=workers)
            times[workers].append(time.perf_counter() - clock)
    one, many = results[1], results[threads]
    same = bool(
        np.array_equal(one.indptr, many.indptr)
        and np.array_equal(one.indices, many.indices)
        and np.array_equal(one.data, many.data)
    )
    print(
        json.dumps(
            {
                "users": len(users),
                "playlists": binary.shape[1],
                "nnz": int(binary.nnz),
                "threads": threads,
                "one_thread_seconds": [round(t, 2) for t in times[1]],
                "threads_seconds": [round(t, 2) for t in times[threads]],
                "speedup": round(min(times[1]) / min(times[threads]), 2),
                "identical": same,
            }
        )
    )


if __name__ == "__main__":
    main()
