"""Try an experiment on real data: held-out listening plays the users' likes.

    split   writes train.tsv (what the models learn from) and heldout.tsv (what each user
            went on to listen to) with the quality protocol's hold-out (RandomState(0)).
    replay  reads users' lists through the API as a client would, sends a view for each list
            shown, and a like for each shown playlist the user listened to in the held-out
            rows; prints what it sent per model version.

The walk-through, on Last.fm (docs/operations.md, "Comparing two model versions"):

    uv run python docs/examples/experiment_replay.py split \\
        ../shared/data/lastfm-2k/user_artists.dat --out /tmp/lastfm
    export ENCORE_HOME=/tmp/lastfm/home
    uv run encore train -i /tmp/lastfm/train.tsv --columns user_id,playlist_id,weight
    uv run encore train -i /tmp/lastfm/train.tsv --columns user_id,playlist_id,weight \\
        --dim 32 --epochs 10 --no-promote
    uv run encore models challenge <the second version> --share 0.5
    uv run encore run
    uv run encore serve --port 8011 &
    uv run python docs/examples/experiment_replay.py replay /tmp/lastfm/heldout.tsv \\
        --url http://127.0.0.1:8011 --users 1000
    uv run encore experiments report

Only the standard library and numpy/pandas (the worker's packages) are used; the replay talks
to the API over HTTP like any client.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
import uuid
from collections import Counter, defaultdict
from pathlib import Path


def split(source: Path, out: Path) -> None:
    import pandas as pd

    from training.protocol import holdout_mask

    rows = pd.read_csv(source, sep="\t", header=None, names=["user_id", "playlist_id", "weight"])
    if not str(rows.iloc[0, 0]).isdigit():  # a header row
        rows = rows.iloc[1:].astype("int64")
    codes = pd.factorize(rows["user_id"])[0]
    held = holdout_mask(codes)
    out.mkdir(parents=True, exist_ok=True)
    rows[~held].to_csv(out / "train.tsv", sep="\t", header=False, index=False)
    rows[held].to_csv(out / "heldout.tsv", sep="\t", header=False, index=False)
    print(f"{(~held).sum():,} training rows, {held.sum():,} held out, in {out}")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def replay(heldout: Path, url: str, users: int, n: int) -> None:
    future: dict[int, set[int]] = defaultdict(set)
    for line in heldout.read_text().splitlines():
        user, playlist, _ = line.split("\t")
        future[int(user)].add(int(playlist))
    chosen = sorted(future)[:users]
    sent: dict[str, Counter] = defaultdict(Counter)
    for start in range(0, len(chosen), 100):
        answer = _post(
            f"{url}/v1/recommendations", {"user_ids": chosen[start : start + 100], "n": n}
        )
        for element in answer["recommendations"]:
            version = element["model_version"]
            event = {
                "user_id": element["user_id"],
                "run_id": answer["run_id"],
                "shown_playlist_ids": element["playlist_ids"],
            }
            _post(f"{url}/v1/feedback", {**event, "event_id": str(uuid.uuid4()), "kind": "view"})
            sent[version]["users"] += 1
            hits = [p for p in element["playlist_ids"] if p in future[element["user_id"]]]
            for playlist in hits:
                _post(
                    f"{url}/v1/feedback",
                    {**event, "event_id": str(uuid.uuid4()), "liked_playlist_id": playlist},
                )
            sent[version]["likes"] += len(hits)
            sent[version]["users who liked"] += bool(hits)
    print(json.dumps({version: dict(counts) for version, counts in sent.items()}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("split")
    one.add_argument("source", type=Path)
    one.add_argument("--out", type=Path, required=True)
    two = commands.add_parser("replay")
    two.add_argument("heldout", type=Path)
    two.add_argument("--url", default="http://127.0.0.1:8000")
    two.add_argument("--users", type=int, default=1000)
    two.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    if args.command == "split":
        split(args.source, args.out)
    else:
        replay(args.heldout, args.url, args.users, args.n)


if __name__ == "__main__":
    main()
