"""`encore demo`: data, a trained model, a published run, then the whole service in one go.

Every step uses the same code as its own command; the stores are whatever the settings say
(embedded SQLite under ENCORE_HOME by default, Redis and Postgres when their URLs are set).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from encore.console import console, stage_progress
from encore.errors import EncoreError
from encore.settings import Settings, get_settings

if TYPE_CHECKING:
    from scheduler.run_metrics import RunMetrics

logger = logging.getLogger("encore.demo")


def demo(
    port: Annotated[int, typer.Option(help="Port of the API and the page.")] = 8000,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    interactions: Annotated[
        Path | None, typer.Option(help="Use this interactions file instead of generated data.")
    ] = None,
    catalog: Annotated[Path | None, typer.Option(help="Playlist names for --interactions.")] = None,
    columns: Annotated[str | None, typer.Option(help="Columns of a header-less file.")] = None,
    sep: Annotated[str | None, typer.Option(help="Field separator.")] = None,
    users: Annotated[int, typer.Option(min=10, help="Generated users.")] = 20_000,
    playlists: Annotated[int, typer.Option(min=10, help="Generated playlists.")] = 4_000,
    fresh: Annotated[bool, typer.Option(help="Generate and train again.")] = False,
    run_evaluation: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Also run the quality protocol.")
    ] = False,
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Serve until Ctrl-C once published.")
    ] = True,
    nights: Annotated[
        int,
        typer.Option(
            min=0,
            help="Then simulate this many nights: new users, likes and a shift of taste "
            "flowing through the nightly pipeline (ingest, refresh, score, publish).",
        ),
    ] = 0,
) -> None:
    """Generate data, train, publish a run, then serve the API, page and scheduler."""
    from scheduler.cron import metrics_registry

    settings = get_settings()
    metrics = metrics_registry(settings)
    prepare(
        settings,
        interactions=interactions,
        catalog=catalog,
        columns=[c.strip() for c in columns.split(",")] if columns else None,
        sep={"\\t": "\t", "tab": "\t"}.get(sep, sep) if sep else None,
        users=users,
        playlists=playlists,
        # The nights start from a model trained on the first day's data.
        fresh=fresh or interactions is not None or nights > 0,
        run_evaluation=run_evaluation,
        metrics=metrics,
    )
    if nights:
        import pandas as pd

        from encore.cli.demo_nights import simulate_nights
        from training.ingest import read_interactions

        rows = read_interactions(
            interactions or settings.home / "demo-data" / "interactions.parquet",
            columns=[c.strip() for c in columns.split(",")] if columns else None,
            sep={"\\t": "\t", "tab": "\t"}.get(sep, sep) if sep else None,
        )
        first_day = pd.DataFrame(
            {"user_id": rows.user_ids, "playlist_id": rows.playlist_ids, "weight": rows.weights}
        )
        simulate_nights(settings, first_day, nights)
    if serve_after:
        serve(settings, host=host, port=port, metrics=metrics)


def _check_port(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise EncoreError(
                f"port {port} on {host} is taken ({exc.strerror}); pass another for the {what}"
            ) from exc


def prepare(
    settings: Settings,
    *,
    interactions: Path | None,
    catalog: Path | None,
    columns: list[str] | None,
    sep: str | None,
    users: int,
    playlists: int,
    fresh: bool,
    run_evaluation: bool,
    metrics: RunMetrics | None = None,
) -> None:
    """Generate (or read) data, train and promote a model, and publish a run.

    With ``metrics`` (the scheduler's, which ``serve`` then exposes) the run is counted in
    them, so the dashboards show the demo's run and not only the nightly ones after it.
    """
    from encore.bundle import promoted_version
    from scheduler.job import run_full
    from training.fit import TrainParams
    from training.ingest import read_catalog, read_interactions
    from training.synthetic import SyntheticSpec, generate
    from training.train import train_bundle

    clock = time.perf_counter()
    if fresh or promoted_version(settings.bundles_dir) is None:
        if interactions is None:
            out = settings.home / "demo-data"
            with stage_progress() as progress:
                data = generate(
                    SyntheticSpec(users=users, playlists=playlists, seed=0),
                    out,
                    progress=progress,
                )
            console.print(f"1/3 generated {data.rows:,} interactions of {users:,} users in {out}")
            interactions, catalog = data.interactions, data.catalog
        rows = read_interactions(interactions, columns=columns, sep=sep)
        names = read_catalog(catalog) if catalog else None
        with stage_progress() as progress:
            bundle, evaluation = train_bundle(
                rows,
                settings.bundles_dir,
                TrainParams(),
                catalog=names,
                run_evaluation=run_evaluation,
                progress=progress,
            )
        quality = (
            f"; recall@10 {evaluation.model.recall_at_10:.3f} vs popularity "
            f"{evaluation.popularity.recall_at_10:.3f}"
            if evaluation
            else ""
        )
        console.print(f"2/3 trained and promoted model {bundle.version}{quality}")
    else:
        console.print(
            f"1-2/3 reusing the promoted model {promoted_version(settings.bundles_dir)} "
            "(pass --fresh to generate and train again)"
        )
    with stage_progress() as progress:
        record = run_full(settings, kind="manual", progress=progress, metrics=metrics)
    console.print(
        f"3/3 published run {record.run_id}: {record.users_scored:,} users "
        f"({record.cold_users:,} cold) in {record.duration_seconds:.1f} s; "
        f"ready after {time.perf_counter() - clock:.0f} s"
    )


def serve(settings: Settings, *, host: str, port: int, metrics: RunMetrics | None = None) -> None:
    """The API and page (uvicorn), the nightly scheduler and its metrics, until Ctrl-C."""
    import uvicorn
    from apscheduler.schedulers.background import BackgroundScheduler
    from prometheus_client import start_http_server

    from scheduler.cron import Jobs, add_jobs, metrics_registry

    _check_port(host, port, "API (--port)")
    _check_port(
        host, settings.scheduler_metrics_port, "scheduler metrics (ENCORE_SCHEDULER_METRICS_PORT)"
    )
    metrics = metrics or metrics_registry(settings)
    server, thread = start_http_server(
        settings.scheduler_metrics_port, addr=host, registry=metrics.registry
    )
    jobs = Jobs(settings, metrics)
    scheduler = BackgroundScheduler(timezone=settings.schedule_timezone)
    add_jobs(scheduler, jobs)
    scheduler.start()
    base = f"http://{host}:{port}"
    console.print(
        "\n[bold]Encore is running[/] (Ctrl-C stops everything)\n"
        f"  feedback page       {base}/\n"
        f"  API docs            {base}/docs\n"
        f"  API metrics         {base}/metrics\n"
        f"  scheduler metrics   http://{host}:{settings.scheduler_metrics_port}/metrics\n"
        f"  try                 curl -s -X POST {base}/v1/recommendations "
        "-H 'content-type: application/json' -d '{\"user_ids\": [1, 2, 3]}'\n"
        f"  next nightly run    {settings.schedule_time:%H:%M} {settings.schedule_timezone}\n",
        highlight=False,
        soft_wrap=True,  # the curl line must stay one line to be copied and pasted
    )
    try:
        uvicorn.run(
            "model_server.main:app", host=host, port=port, log_level="warning", access_log=False
        )
    finally:
        jobs.stop.set()  # a run in progress stops before its flip
        scheduler.shutdown(wait=True)
        server.shutdown()
        thread.join(timeout=5)
        console.print("stopped: API, scheduler and metrics server")
