"""Data and models' quality: `encore generate`, `encore train`, `encore evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from encore.console import console, stage_progress
from encore.settings import Settings, get_settings

InteractionsOpt = Annotated[
    Path, typer.Option("--interactions", "-i", help="CSV, TSV or Parquet interactions file.")
]
ColumnsOpt = Annotated[
    str | None,
    typer.Option(help="Names for a header-less file, e.g. user_id,playlist_id,weight (_ skips)."),
]
SepOpt = Annotated[str | None, typer.Option(help="Field separator; default from the suffix.")]
ItemMethodOpt = Annotated[
    str | None,
    typer.Option(
        "--item-method",
        help="Item-item candidate generator: auto (EASE up to ENCORE_EASE_MAX_ITEMS playlists, "
        "item-KNN above), ease, knn or none [auto].",
    ),
]
ItemCandidatesOpt = Annotated[
    int | None, typer.Option(min=0, help="Candidates per user from the item-item generator [50].")
]
PenaltyOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Popularity penalty of the ranking (score - penalty * log(1 + popularity)); "
        "unset: chosen on the inner split (cross-fitted).",
    ),
]
EaseLambdaOpt = Annotated[
    float | None,
    typer.Option(min=0.001, help="EASE's regularisation (> 0); unset: chosen on an inner split."),
]
InnerFoldsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=10,
        help="Inner folds the ranker learns from; unset: 2, up to 4 where users are few.",
    ),
]
EaseDropoutOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=0.95,
        help="EASE's popularity regularisation as EDLAE's dropout (0 = plain EASE); unset: "
        "chosen on an inner split.",
    ),
]


def _columns(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",")] if value else None


def _sep(value: str | None) -> str | None:
    return {"\\t": "\t", "tab": "\t"}.get(value, value) if value else None


def generate(
    users: Annotated[int, typer.Option(min=1, help="Number of users.")],
    playlists: Annotated[int, typer.Option(min=2, help="Number of playlists.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files.")] = 0,
) -> None:
    """Write a realistic synthetic data set (interactions.parquet, catalog.parquet)."""
    from training.synthetic import SyntheticSpec
    from training.synthetic import generate as run_generate

    with stage_progress() as progress:
        data = run_generate(
            SyntheticSpec(users=users, playlists=playlists, seed=seed),
            out,
            progress=progress,
        )
    console.print(
        f"wrote {data.rows:,} interactions of {data.users:,} users over {data.playlists:,} "
        f"playlists to {data.interactions} and the catalog to {data.catalog}"
    )


def _train_params(**overrides: object):
    from training.fit import TrainParams

    return TrainParams(**{k: v for k, v in overrides.items() if v is not None})


def _item_method(name: str | None) -> str | None:
    from encore.errors import EncoreError
    from training.items import ITEM_METHODS

    if name is not None and name not in ITEM_METHODS:
        raise EncoreError(
            f"unknown --item-method {name!r}: choose one of {', '.join(ITEM_METHODS)}"
        )
    return name


def _engine(name: str) -> str:
    from encore.errors import EncoreError
    from encore.settings import ENGINES

    if name not in ENGINES:
        raise EncoreError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    return name


def train(
    interactions: Annotated[
        Path | None,
        typer.Option(
            "--interactions",
            "-i",
            help="CSV, TSV or Parquet interactions file [ENCORE_INTERACTIONS: a file, or a "
            "directory of partitions, with the feedback page's likes].",
        ),
    ] = None,
    catalog: Annotated[
        Path | None, typer.Option(help="Playlist names (playlist_id, name).")
    ] = None,
    columns: ColumnsOpt = None,
    sep: SepOpt = None,
    neighbours: Annotated[int | None, typer.Option(min=1, help="K neighbours [50].")] = None,
    candidates: Annotated[int | None, typer.Option(min=1, help="Candidates per user [75].")] = None,
    dim: Annotated[int | None, typer.Option(min=2, help="Embedding dimension [128].")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Ranker epochs [40].")] = None,
    pairing: Annotated[str | None, typer.Option(help="auto, exact or ann [auto].")] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="Where the ann pairing's neighbour search runs: local or ray [ENCORE_ENGINE]."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [0].")] = None,
    item_method: ItemMethodOpt = None,
    item_candidates: ItemCandidatesOpt = None,
    ease_lambda: EaseLambdaOpt = None,
    ease_dropout: EaseDropoutOpt = None,
    inner_folds: InnerFoldsOpt = None,
    popularity_penalty: PenaltyOpt = None,
    run_evaluation: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Also run the quality protocol.")
    ] = True,
    promote_bundle: Annotated[
        bool, typer.Option("--promote/--no-promote", help="Make it the model the runs use.")
    ] = True,
) -> None:
    """Pair users, train the ranker and write a versioned model bundle."""
    from training.ingest import read_catalog, read_interactions
    from training.train import train_bundle

    settings = get_settings()
    if interactions is not None:
        data = read_interactions(interactions, columns=_columns(columns), sep=_sep(sep))
    elif settings.interactions is not None:
        data = _source_with_likes(settings)
    else:
        raise typer.BadParameter(
            "give --interactions FILE, or set ENCORE_INTERACTIONS", param_hint="--interactions"
        )
    names = read_catalog(catalog) if catalog else None
    params = _train_params(
        neighbours=neighbours,
        candidates=candidates,
        dim=dim,
        epochs=epochs,
        pairing_method=pairing,
        seed=seed,
        pairing_engine=_engine(engine or settings.engine),
        ray_address=settings.ray_address,
        item_method=_item_method(item_method),
        item_candidates=item_candidates,
        ease_lambda=ease_lambda,
        ease_dropout=ease_dropout,
        inner_folds=inner_folds,
        popularity_penalty=popularity_penalty,
        ease_max_items=settings.ease_max_items,
    )
    with stage_progress() as progress:
        bundle, evaluation = train_bundle(
            data,
            settings.bundles_dir,
            params,
            catalog=names,
            run_evaluation=run_evaluation,
            promote_bundle=promote_bundle,
            release_rows=True,
            progress=progress,
        )
    if evaluation:
        _print_evaluation(evaluation.as_dict())
    state = "promoted" if promote_bundle else "not promoted"
    console.print(
        f"bundle [bold]{bundle.version}[/] written to {bundle.path} ({state}); "
        f"trained in {bundle.metadata['training']['seconds']:.1f} s"
    )


def _source_with_likes(settings: Settings):
    """ENCORE_INTERACTIONS as the nightly run reads it: what is new ingested, likes added."""
    from encore.database import open_database
    from training.freshness import liked_pairs
    from training.source import ingest, with_likes

    result = ingest(
        settings.interactions, settings.ingest_dir, columns=settings.interactions_columns
    )
    for name, error in result.set_aside.items():
        console.print(f"[red]set aside[/red] {name}: {error}", highlight=False)
    with open_database(settings) as db:
        users, playlists = liked_pairs(db)
    return with_likes(result.interactions, users, playlists, settings.like_weight)


def evaluate(
    interactions: InteractionsOpt,
    columns: ColumnsOpt = None,
    sep: SepOpt = None,
    neighbours: Annotated[int | None, typer.Option(min=1)] = None,
    candidates: Annotated[int | None, typer.Option(min=1)] = None,
    dim: Annotated[int | None, typer.Option(min=2)] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    pairing: Annotated[str | None, typer.Option(help="auto, exact or ann [auto].")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    item_method: ItemMethodOpt = None,
    item_candidates: ItemCandidatesOpt = None,
    ease_lambda: EaseLambdaOpt = None,
    ease_dropout: EaseDropoutOpt = None,
    inner_folds: InnerFoldsOpt = None,
    popularity_penalty: PenaltyOpt = None,
    sweep: Annotated[
        bool,
        typer.Option(
            "--sweep",
            help="Also measure every popularity penalty on the test lists: a table, and a PNG "
            "of recall@10 against coverage@10 (under ENCORE_HOME/reports unless --plot).",
        ),
    ] = False,
    plot: Annotated[Path | None, typer.Option(help="Where --sweep writes its PNG.")] = None,
) -> None:
    """Run the quality protocol: recall@10 and NDCG@10 of the model and of popularity.

    The figures are stored in the newest bundle trained on the same data with the same
    hyper-parameters, if there is one.
    """
    from training.evaluate import evaluate as run_evaluate
    from training.ingest import read_interactions
    from training.ranker_training import PENALTIES
    from training.sweep_plot import plot_sweep
    from training.train import find_bundle_for

    data = read_interactions(interactions, columns=_columns(columns), sep=_sep(sep))
    params = _train_params(
        neighbours=neighbours,
        candidates=candidates,
        dim=dim,
        epochs=epochs,
        pairing_method=pairing,
        seed=seed,
        item_method=_item_method(item_method),
        item_candidates=item_candidates,
        ease_lambda=ease_lambda,
        ease_dropout=ease_dropout,
        inner_folds=inner_folds,
        popularity_penalty=popularity_penalty,
        ease_max_items=get_settings().ease_max_items,
    )
    penalties = PENALTIES if sweep else None
    with stage_progress() as progress:
        result = run_evaluate(data, params, progress=progress, sweep=penalties).as_dict()
    _print_evaluation(result)
    if sweep:
        _print_sweep(result["sweep"])
        path = plot or get_settings().home / "reports" / f"sweep-{_stamp()}.png"
        name = Path(interactions).name
        plot_sweep(result["sweep"], path, title=f"{name}: popularity penalty (quality protocol)")
        console.print(f"trade-off plot written to {path}")
    hyperparameters = json.loads(json.dumps(params.as_dict()))  # as the metadata holds them
    bundle = find_bundle_for(get_settings().bundles_dir, data.fingerprint, hyperparameters)
    if bundle is not None:
        bundle.update_metrics(result)
        console.print(f"stored in bundle {bundle.version}")
    else:
        console.print("not stored: no bundle was trained on this data with these hyper-parameters")
    print(json.dumps(result), flush=True)


def _stamp() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _print_sweep(rows: list[dict]) -> None:
    table = Table(title="Popularity penalty: the test lists at each (reported, not chosen here)")
    for column in ("penalty", "recall@10", "NDCG@10", "coverage@10", "top-decile", "novelty"):
        table.add_column(column, justify="right")
    for row in rows:
        mark = " (chosen)" if row["chosen"] else ""
        table.add_row(
            f"{row['popularity_penalty']:g}{mark}",
            f"{row['recall@10']:.4f}",
            f"{row['ndcg@10']:.4f}",
            f"{row['coverage@10']:.4f}",
            f"{row['top_decile_share@10']:.3f}",
            f"{row['novelty@10']:.2f}",
        )
    console.print(table)


def _print_evaluation(result: dict) -> None:
    table = Table(title="Quality protocol (holdout 20%, full ranking)")
    table.add_column("method")
    table.add_column("recall@10", justify="right")
    table.add_column("NDCG@10", justify="right")
    reach = "coverage@10" in result
    if reach:
        table.add_column("coverage@10", justify="right")
        table.add_column("top-decile share", justify="right")
        table.add_column("novelty (bits)", justify="right")
    rows = [
        ("popularity", "popularity_"),
        ("neighbours alone", "neighbours_"),
        ("item model alone", "item_model_"),
        ("encore (pairing + ranker)", ""),
    ]
    for label, prefix in rows:
        if prefix + "recall@10" not in result:
            continue
        row = [label, f"{result[prefix + 'recall@10']:.4f}", f"{result[prefix + 'ndcg@10']:.4f}"]
        if reach:
            row += [
                f"{result[prefix + 'coverage@10']:.4f}",
                f"{result[prefix + 'top_decile_share@10']:.3f}",
                f"{result[prefix + 'novelty@10']:.2f}",
            ]
        table.add_row(*row)
    console.print(table)
    found = {
        k.removeprefix("candidate_recall_"): v
        for k, v in result.items()
        if k.startswith("candidate_recall_")
    }
    if found:
        candidates = Table(title="Candidates: share of the held-out playlists they hold")
        for name in found:
            candidates.add_column(name.replace("_", " "), justify="right")
        candidates.add_row(*(f"{value:.4f}" for value in found.values()))
        console.print(candidates)
    chosen = {
        label: result[key]
        for label, key in (
            ("inner folds", "chosen_inner_folds"),
            ("EASE λ", "chosen_ease_lambda"),
            ("EASE dropout", "chosen_ease_dropout"),
            ("epochs", "chosen_epochs"),
            ("popularity penalty", "chosen_popularity_penalty"),
        )
        if key in result
    }
    if "chosen_features" in result:
        from inference.ranker import FEATURES

        # All of them, or the item model's alone where the rest added only noise.
        features = result["chosen_features"]
        chosen["ranker features"] = "all" if tuple(features) == FEATURES else ", ".join(features)
    if chosen:
        console.print(
            "chosen on the inner split: "
            + ", ".join(
                f"{k} {v:g}" if isinstance(v, int | float) else f"{k}: {v}"
                for k, v in chosen.items()
            )
        )
    console.print(
        f"{result['users_evaluated']:,} users evaluated, {result['held_out']:,} held-out rows, "
        f"fit in {result['train_seconds']:.1f} s"
    )
