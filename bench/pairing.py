"""Benchmark of the user pairing model (low-rank factors, neighbours, candidates).

Generates (or reuses, from ``--cache``) a synthetic data set of N users, builds the
interaction matrix, then times each stage as ``pair_users`` and ``fit`` run them. The machine
is shared and noisy, so the run also times a fixed reference workload of the same size (one
plain scipy product ``X.T @ dense(users x 128)``, before and after the pairing) and reports
the pairing's time as a multiple of it: compare ``ratio`` across runs, not seconds.
Prints one JSON line.

    uv run python bench/pairing.py --users 1000000 --cache /tmp/encore-bench
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch


def default_playlists(users: int) -> int:
    # The catalog grows slower than the audience: 100k users -> 20k, 1M -> 100k playlists.
    return max(1000, int(round(20_000 * (users / 100_000) ** 0.7, -3)))


def _generate(users: int, playlists: int, seed: int, out: str) -> None:
    from training.synthetic import SyntheticSpec, generate

    generate(SyntheticSpec(users=users, playlists=playlists, seed=seed), out)


def cached_data(cache: Path, users: int, playlists: int, seed: int) -> Path:
    """The interactions file of this spec, generated in a child process when missing.

    A child keeps the generator's memory out of this process's peak RSS.
    """
    directory = cache / f"users{users}_playlists{playlists}_seed{seed}"
    path = directory / "interactions.parquet"
    if not (directory / "generate.json").exists():
        context = multiprocessing.get_context("spawn")
        child = context.Process(target=_generate, args=(users, playlists, seed, str(directory)))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"generating {directory} failed ({child.exitcode})")
    return path


def reference_seconds(matrix: sp.csr_matrix, repeats: int = 3) -> float:
    """Best of a few runs of one single-threaded sparse product of the matrix's size."""
    dense = np.random.default_rng(0).standard_normal((matrix.shape[0], 128), dtype=np.float32)
    transposed = matrix.T.tocsr()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        transposed @ dense
        times.append(time.perf_counter() - start)
    return min(times)


def run(args: argparse.Namespace) -> dict:
    from training.ingest import read_interactions
    from training.matrix import encode, interaction_matrix, low_rank_factors
    from training.pairing import (
        PairingParams,
        ann_neighbours,
        candidates_from_neighbours,
        exact_neighbours,
    )

    playlists = args.playlists or default_playlists(args.users)
    path = cached_data(Path(args.cache), args.users, playlists, args.seed)
    clock = time.perf_counter()
    interactions = read_interactions(path)
    users, user_codes = encode(interactions.user_ids)
    items, item_codes = encode(interactions.playlist_ids)
    matrix = interaction_matrix(
        user_codes, item_codes, interactions.weights, (len(users), len(items))
    )
    del interactions, user_codes, item_codes
    load_seconds = time.perf_counter() - clock

    params = PairingParams(args.neighbours, args.candidates, args.method)
    method = params.resolve(matrix)
    before = reference_seconds(matrix)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    if method == "ann":
        factors, _ = low_rank_factors(matrix, seed=args.seed)
        seconds["svd"] = time.perf_counter() - clock
        clock = time.perf_counter()
        nbr_idx, nbr_sim = ann_neighbours(factors, params.neighbours)
        del factors
    else:
        seconds["svd"] = 0.0
        nbr_idx, nbr_sim = exact_neighbours(matrix, params.neighbours)
    seconds["neighbours"] = time.perf_counter() - clock
    clock = time.perf_counter()
    pairs = candidates_from_neighbours(matrix, nbr_idx, nbr_sim, params.candidates)
    seconds["candidates"] = time.perf_counter() - clock
    after = reference_seconds(matrix)
    total = sum(seconds.values())
    baseline = statistics.mean([before, after])
    lengths = pairs.lengths()
    return {
        "users": matrix.shape[0],
        "playlists": matrix.shape[1],
        "rows": int(matrix.nnz),
        "method": method,
        "threads": torch.get_num_threads(),
        "load_seconds": round(load_seconds, 2),
        "svd_seconds": round(seconds["svd"], 2),
        "neighbours_seconds": round(seconds["neighbours"], 2),
        "candidates_seconds": round(seconds["candidates"], 2),
        "total_seconds": round(total, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "baseline": "scipy X.T @ dense(users x 128), best of 3, before and after",
        "baseline_seconds": [round(before, 3), round(after, 3)],
        "ratio": round(total / baseline, 1),
        "cold_users": int((lengths == 0).sum()),
        "mean_candidates": round(float(lengths.mean()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--playlists", type=int, default=0, help="0: scaled with --users")
    parser.add_argument("--cache", default="/tmp/encore-bench", help="generated data sets")
    parser.add_argument("--method", default="ann", choices=("auto", "exact", "ann"))
    parser.add_argument("--neighbours", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=75)
    parser.add_argument("--seed", type=int, default=0)
    print(json.dumps(run(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
