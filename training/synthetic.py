"""A seeded synthetic listening data set with the structure real data has.

Taste communities (users draw most of their playlists from one or two communities), power-law
playlist popularity, power-law user activity with a share of users holding one or two
interactions, listen counts as weights, timestamps, and a catalog of playlist names.
Users are generated in chunks written to Parquet, so memory stays bounded at any size, and
each chunk has its own seed, so the output does not depend on the chunk being resumed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from encore.progress import Progress

MOODS = (
    "Late Night",
    "Sunday Morning",
    "Rainy Day",
    "Summer",
    "Workout",
    "Focus",
    "Road Trip",
    "Chill",
    "Throwback",
    "Deep",
    "Golden Hour",
    "After Hours",
    "Cozy",
    "Electric",
    "Café",
)
GENRES = (
    "Lo-fi",
    "Indie",
    "Jazz",
    "Techno",
    "Hip-Hop",
    "Folk",
    "Metal",
    "Soul",
    "Ambient",
    "Pop",
    "Punk",
    "Classical",
    "Reggae",
    "K-Pop",
    "Afrobeats",
    "Rock & Roll",
    "R&B",
    "Bossa Nova",
)
NOUNS = ("Mix", "Essentials", "Vibes", "Sessions", "Anthems", "Radio", "Hits", "Diaries")
SPECIAL = ('"Quoted" Picks', "東京 Nights", "Ça va <3", "Niño's Songs", "Ελληνικά", "50% Off & On")


@dataclass(frozen=True)
class SyntheticSpec:
    users: int
    playlists: int
    seed: int = 0
    communities: int = 0  # 0: one per 400 playlists, at least 8
    chunk_users: int = 50_000
    light_user_share: float = 0.15  # users with one or two interactions
    activity_exponent: float = 1.4  # Pareto tail of interactions per user
    popularity_exponent: float = 0.9  # Zipf exponent of playlist popularity
    own_community_share: float = 0.75
    second_community_share: float = 0.15
    max_interactions: int = 1500

    @property
    def resolved_communities(self) -> int:
        return self.communities or max(8, self.playlists // 400)


@dataclass(frozen=True)
class GeneratedData:
    interactions: Path
    catalog: Path
    rows: int
    users: int
    playlists: int


def generate(
    spec: SyntheticSpec, out: str | Path, *, progress: Progress | None = None
) -> GeneratedData:
    """Write ``interactions.parquet`` and ``catalog.parquet`` into ``out``."""
    if spec.users < 1 or spec.playlists < 2:
        raise ValueError(
            f"need at least 1 user and 2 playlists, got {spec.users}, {spec.playlists}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = _World.build(spec)
    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("playlist_id", pa.int64()),
            ("weight", pa.float32()),
            ("timestamp", pa.int64()),
        ]
    )
    interactions_path = out / "interactions.parquet"
    rows = 0
    with pq.ParquetWriter(interactions_path, schema, compression="zstd") as writer:
        for start in range(0, spec.users, spec.chunk_users):
            stop = min(spec.users, start + spec.chunk_users)
            chunk = world.users_chunk(start, stop, chunk_index=start // spec.chunk_users)
            writer.write_table(pa.Table.from_pydict(chunk, schema=schema))
            rows += len(chunk["user_id"])
            if progress:
                progress("generate users", stop, spec.users)
    catalog_path = out / "catalog.parquet"
    pq.write_table(world.catalog(), catalog_path, compression="zstd")
    (out / "generate.json").write_text(json.dumps({**asdict(spec), "rows": rows}, indent=2))
    return GeneratedData(interactions_path, catalog_path, rows, spec.users, spec.playlists)


@dataclass
class _World:
    spec: SyntheticSpec
    community_p: np.ndarray
    by_community: np.ndarray  # playlist codes ordered by community
    community_cum: np.ndarray  # cumulative popularity along by_community
    community_base: np.ndarray  # cumulative total before each community
    community_total: np.ndarray
    global_cum: np.ndarray
    playlist_community: np.ndarray

    @classmethod
    def build(cls, spec: SyntheticSpec) -> _World:
        rng = np.random.default_rng([spec.seed, 0xC0FFEE])
        n_comm = spec.resolved_communities
        community_p = 1.0 / np.arange(1, n_comm + 1) ** 0.8
        community_p /= community_p.sum()
        playlist_community = rng.choice(n_comm, size=spec.playlists, p=community_p)
        ranks = rng.permutation(spec.playlists) + 1
        popularity = 1.0 / ranks.astype(np.float64) ** spec.popularity_exponent
        by_community = np.argsort(playlist_community, kind="stable")
        community_cum = np.cumsum(popularity[by_community])
        counts = np.bincount(playlist_community, minlength=n_comm)
        ends = np.cumsum(counts)
        totals_at_end = np.where(ends > 0, community_cum[np.maximum(ends - 1, 0)], 0.0)
        base = np.r_[0.0, totals_at_end[:-1]]
        # A community with no playlist borrows the next one's range; it is never empty then.
        total = totals_at_end - base
        return cls(
            spec=spec,
            community_p=community_p,
            by_community=by_community,
            community_cum=community_cum,
            community_base=base,
            community_total=total,
            global_cum=np.cumsum(popularity),
            playlist_community=playlist_community,
        )

    def users_chunk(self, start: int, stop: int, *, chunk_index: int) -> dict[str, np.ndarray]:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, chunk_index, 1])
        n = stop - start
        activity = np.floor(3.0 * (1.0 - rng.random(n)) ** (-1.0 / spec.activity_exponent))
        light = rng.random(n) < spec.light_user_share
        activity = np.where(light, rng.integers(1, 3, n), activity)
        activity = np.minimum(activity, min(spec.max_interactions, spec.playlists // 2)).astype(
            np.int64
        )
        own = self._pick_communities(rng, n)
        second = self._pick_communities(rng, n)
        user_of = np.repeat(np.arange(n), activity)
        draw = rng.random(len(user_of))
        community = np.where(draw < spec.own_community_share, own[user_of], second[user_of])
        playlist = self._sample_in_community(rng, community)
        from_global = draw >= spec.own_community_share + spec.second_community_share
        if from_global.any():
            target = rng.random(int(from_global.sum())) * self.global_cum[-1]
            playlist[from_global] = np.searchsorted(self.global_cum, target, side="right")
        playlist = np.minimum(playlist, spec.playlists - 1)
        key = np.unique(user_of.astype(np.int64) * spec.playlists + playlist)
        user_code, playlist_code = np.divmod(key, spec.playlists)
        # File order mixes users the way an event log does, rather than sorted by user.
        order = rng.permutation(len(key))
        user_code, playlist_code = user_code[order], playlist_code[order]
        weights = np.floor(rng.lognormal(1.5, 1.3, len(key))) + 1
        timestamps = 1_767_225_600 + rng.integers(0, 180 * 86_400, len(key))
        return {
            "user_id": user_code + start + 1,
            "playlist_id": playlist_code + 1,
            "weight": weights.astype(np.float32),
            "timestamp": timestamps.astype(np.int64),
        }

    def _pick_communities(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.searchsorted(np.cumsum(self.community_p), rng.random(n) * 0.999999)

    def _sample_in_community(self, rng: np.random.Generator, community: np.ndarray) -> np.ndarray:
        base = self.community_base[community]
        total = self.community_total[community]
        empty = total <= 0
        if empty.any():
            base = np.where(empty, 0.0, base)
            total = np.where(empty, self.global_cum[-1], total)
        target = base + rng.random(len(community)) * total
        position = np.searchsorted(self.community_cum, target, side="right")
        return self.by_community[np.minimum(position, len(self.by_community) - 1)]

    def catalog(self) -> pa.Table:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, 7])
        moods = rng.integers(0, len(MOODS), spec.playlists)
        nouns = rng.integers(0, len(NOUNS), spec.playlists)
        genres = self.playlist_community % len(GENRES)
        names = [
            f"{MOODS[m]} {GENRES[g]} {NOUNS[k]} #{i + 1}"
            for i, (m, g, k) in enumerate(zip(moods, genres, nouns, strict=True))
        ]
        for i in range(0, spec.playlists, 97):
            names[i] = f"{SPECIAL[(i // 97) % len(SPECIAL)]} #{i + 1}"
        return pa.table(
            {
                "playlist_id": pa.array(np.arange(1, spec.playlists + 1), pa.int64()),
                "name": pa.array(names, pa.string()),
            }
        )
