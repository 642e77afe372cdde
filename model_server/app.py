"""The FastAPI application: stores opened in the lifespan, routes, errors, the page."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from encore.database import open_async_database, open_database
from encore.errors import NoPublishedRun, StoreUnavailable
from encore.online import open_online_reader
from encore.redact import install_log_redaction
from encore.settings import get_settings
from model_server import api_metrics, errors, experiment_metrics, openapi
from model_server.middleware import BodySizeLimit
from model_server.routes import (
    experiments,
    feedback,
    health,
    model,
    playlists,
    recommendations,
    runs,
)
from model_server.state import ServingState

GAUGES_STOP_SECONDS = 5.0


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Again here: a server (uvicorn) sets up its own log handlers after the CLI did.
    install_log_redaction()
    settings = get_settings()
    if not settings.database_url:
        open_database(settings).close()  # creates or upgrades the embedded SQLite schema
    reader = open_online_reader(settings)
    database = open_async_database(settings)
    try:
        # Does not wait for Postgres: recommendations need only the online store.
        await database.open()
        api_metrics.initialise()
        app.state.serving = ServingState(settings, reader, database)
        gauges = asyncio.create_task(
            experiment_metrics.refresh_forever(
                database, interval_seconds=settings.experiment_metrics_seconds
            )
        )
        try:
            yield
        finally:
            gauges.cancel()
            # Bounded: a query cut short by the cancellation must not hold the shutdown.
            await asyncio.wait({gauges}, timeout=GAUGES_STOP_SECONDS)
    finally:
        # Closed in reverse order of opening.
        await database.aclose()
        await reader.aclose()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="Encore",
        summary="Nightly batch recommendations, served.",
        version="0.1.0",
        lifespan=lifespan,
    )
    for router in (
        recommendations.router,
        feedback.router,
        runs.router,
        experiments.router,
        model.router,
        playlists.router,
        health.router,
    ):
        app.include_router(router)
    app.add_exception_handler(StarletteHTTPException, errors.http_error)
    app.add_exception_handler(StoreUnavailable, errors.store_unavailable)
    app.add_exception_handler(NoPublishedRun, errors.no_published_run)
    app.add_exception_handler(Exception, errors.internal_error)
    openapi.install(app, top_n=settings.top_n)
    page = resources.files("client_app")
    app.mount("/static", StaticFiles(directory=str(page / "static")), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(page / "index.html"), media_type="text/html")

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
