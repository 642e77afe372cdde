"""The FastAPI application: stores opened in the lifespan, routes, errors, the page."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from encore.database import open_async_database, open_database
from encore.errors import NoPublishedRun, StoreUnavailable
from encore.online import open_online_reader
from encore.settings import get_settings
from model_server import metrics
from model_server.middleware import BodySizeLimit
from model_server.routes import feedback, health, model, recommendations, runs
from model_server.state import ServingState

logger = logging.getLogger("encore.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if not settings.database_url:
        open_database(settings).close()  # creates or upgrades the embedded SQLite schema
    reader = open_online_reader(settings)
    database = open_async_database(settings)
    try:
        await database.open()
        metrics.initialise()
        app.state.serving = ServingState(settings, reader, database)
        yield
    finally:
        # Closed in reverse order of opening.
        await database.aclose()
        await reader.aclose()


async def _unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
    logger.warning("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": str(exc)}, status_code=503)


async def _no_run(request: Request, exc: NoPublishedRun) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)


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
        model.router,
        health.router,
    ):
        app.include_router(router)
    app.add_exception_handler(StoreUnavailable, _unavailable)
    app.add_exception_handler(NoPublishedRun, _no_run)
    app.add_exception_handler(Exception, _internal)
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
