"""Benchmark of `encore train --no-evaluate` at scale: wall time, peak memory, stage times.

Generates (or reuses, from ``--cache``) a synthetic data set of N users x P playlists, then runs
``encore train --no-evaluate --no-promote`` as a child process, as an operator would, sampling
the child's memory: peak RSS, split into anonymous memory (what the process holds) and mapped
file pages (the kernel can drop them). The baseline, measured in the same run and also in a
child: reading the interactions and building the user x playlist matrix, the part of training
nothing can skip. Prints one JSON line.

    uv run python bench/train.py --users 1000000 --playlists 100000
    uv run python bench/train.py --users 10000000 --playlists 200000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairing import cached_data, default_playlists

FLOOR = """
import sys
from training.ingest import read_interactions
from training.matrix import encode, interaction_matrix
interactions = read_interactions(sys.argv[1])
users, user_codes = encode(interactions.user_ids)
items, item_codes = encode(interactions.playlist_ids)
interaction_matrix(user_codes, item_codes, interactions.weights, (len(users), len(items)))
"""


class ChildMemory:
    """Peaks of a child's VmRSS, RssAnon and RssFile, sampled twice a second."""

    FIELDS = ("VmRSS:", "RssAnon:", "RssFile:")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                lines = Path(f"/proc/{self.pid}/status").read_text().splitlines()
            except (FileNotFoundError, ProcessLookupError):
                return
            for line in lines:
                name = line.split(":")[0] + ":"
                if name in self.peak:
                    self.peak[name] = max(self.peak[name], int(line.split()[1]))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return {name.rstrip(":"): kb // 1024 for name, kb in self.peak.items()}


def timed_child(command: list[str], env: dict[str, str]) -> tuple[float, dict[str, int], str]:
    clock = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    memory = ChildMemory(child.pid)
    output = child.communicate()[0].decode(errors="replace")
    seconds = time.perf_counter() - clock
    peaks = memory.stop()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{output[-3000:]}")
    return seconds, peaks, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--playlists", type=int, default=0, help="0: scaled with --users")
    parser.add_argument("--cache", default="/tmp/encore-bench", help="generated data sets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", help="ENCORE_HOME for the bundle (default: a temporary one)")
    args = parser.parse_args()

    playlists = args.playlists or default_playlists(args.users)
    path = cached_data(Path(args.cache), args.users, playlists, args.seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCORE_")}
    with tempfile.TemporaryDirectory(prefix="encore-train-bench-") as tmp:
        home = Path(args.home or tmp)
        if args.home and (home / "bundles").exists():
            raise SystemExit(f"{home} already holds bundles: give an empty --home")
        floor_seconds, floor_peaks, _ = timed_child([sys.executable, "-c", FLOOR, str(path)], env)
        command = [sys.executable, "-m", "encore", "train", "-i", str(path)]
        seconds, peaks, _ = timed_child(
            [*command, "--no-evaluate", "--no-promote", "--seed", str(args.seed)],
            {**env, "ENCORE_HOME": str(home), "COLUMNS": "200"},
        )
        (bundle,) = (b for b in (home / "bundles").iterdir() if (b / "metadata.json").exists())
        metadata = json.loads((bundle / "metadata.json").read_text())
        size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    training = metadata["training"]
    print(
        json.dumps(
            {
                "users": metadata["data"]["users"],
                "playlists": metadata["data"]["playlists"],
                "rows": metadata["data"]["rows"],
                "seconds": round(seconds, 1),
                "stages_seconds": training["stages_seconds"],
                "peak_rss_mb": peaks["VmRSS"],
                "peak_anonymous_mb": peaks["RssAnon"],
                "peak_file_mapped_mb": peaks["RssFile"],
                "floor": "read the interactions and build the matrix, in a child",
                "floor_seconds": round(floor_seconds, 1),
                "floor_peak_rss_mb": floor_peaks["VmRSS"],
                "ratio_to_floor": round(seconds / floor_seconds, 1),
                "cold_users": training["cold_users"],
                "bundle_mb": round(size / 2**20),
                "threads": os.cpu_count(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
