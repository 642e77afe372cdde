"""Error answers of the API: one documented body shape, 503s that say what is down.

Every error answer is ``{"detail": ...}``: a list of ``{loc, msg, type}`` for a 422 (the
shape FastAPI gives its own validation errors, used for the API's own checks too), a string
otherwise. A 503 adds ``component`` (what is down) and a ``Retry-After`` header; it never
carries the store's URL, its error text or a traceback: those go to the (redacted) log.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from fastapi import Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from encore.errors import DATABASE, ONLINE_STORE, NoPublishedRun, StoreUnavailable

logger = logging.getLogger("encore.api")

Component = Literal["online_store", "database"]

# Seconds a client should wait before trying again. The online store comes back within a
# restart; the database may be failing over; a first run takes minutes to publish.
RETRY_AFTER_SECONDS = {ONLINE_STORE: 1, DATABASE: 5}
NO_RUN_RETRY_AFTER_SECONDS = 30
UNAVAILABLE_DETAIL = {
    ONLINE_STORE: "the online store is unavailable; try again shortly",
    DATABASE: "the database of run records and feedback is unavailable; try again shortly",
}


class ValidationIssue(BaseModel):
    """One thing wrong with a request: where (``loc``), what (``type``) and why (``msg``)."""

    loc: list[str | int] = Field(description='Where: e.g. ["body", "user_ids", 3].')
    msg: str
    type: str = Field(description="pydantic's error type, e.g. int_type, less_than_equal.")
    input: Any = Field(None, description="The value refused, when there is one.")
    ctx: dict[str, Any] = Field(default_factory=dict, description="The limit broken, if any.")


class ErrorBody(BaseModel):
    """Every error answer of the API."""

    detail: str | list[ValidationIssue] = Field(
        description="What was wrong: the list of validation issues for a 422, a sentence else."
    )
    component: Component | None = Field(
        None, description="503 only: the part of the system that is unavailable."
    )


def invalid(
    loc: tuple[str | int, ...], msg: str, *, kind: str, value: Any, **ctx: Any
) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own, for checks a schema cannot express."""
    error = {"loc": loc, "msg": msg, "type": kind, "input": value}
    if ctx:
        error["ctx"] = ctx
    return RequestValidationError([error])


def unavailable_response(
    component: str | None, detail: str, retry_after_seconds: int
) -> JSONResponse:
    return JSONResponse(
        {"detail": detail, "component": component},
        status_code=503,
        headers={"Retry-After": str(retry_after_seconds)},
    )


class OutageLog:
    """One warning when a component starts failing, then one per ``every_seconds``.

    An outage answers hundreds of requests a second with 503: a line for each would drown
    the log (and the disk) while saying nothing new.
    """

    def __init__(self, *, every_seconds: float = 10.0) -> None:
        self.every_seconds = every_seconds
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, component: str, where: str, exc: Exception) -> None:
        now = time.monotonic()
        last = self._last.get(component)
        if last is not None and now - last < self.every_seconds:
            self._suppressed[component] = self._suppressed.get(component, 0) + 1
            return
        suppressed = self._suppressed.pop(component, 0)
        self._last[component] = now
        more = f" ({suppressed} more failures since the last report)" if suppressed else ""
        logger.warning("%s unavailable (%s): %s%s", component, where, exc, more)


outages = OutageLog()


async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
    component = exc.component if exc.component in UNAVAILABLE_DETAIL else None
    outages.warn(component or "store", f"{request.method} {request.url.path}", exc)
    detail = UNAVAILABLE_DETAIL.get(component, "a store is unavailable; try again shortly")
    return unavailable_response(component, detail, RETRY_AFTER_SECONDS.get(component, 5))


async def no_published_run(request: Request, exc: NoPublishedRun) -> JSONResponse:
    return unavailable_response(ONLINE_STORE, str(exc), NO_RUN_RETRY_AFTER_SECONDS)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own answer, but a body it could not parse is a 422 like any bad JSON."""
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's "There was an error parsing the body": json.loads failed other than
        # with a JSONDecodeError (which FastAPI already answers 422, json_invalid).
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):
            why = f"the body is not {cause.encoding} text (byte {cause.start}: {cause.reason})"
        elif isinstance(cause, RecursionError):
            why = "the JSON body is nested too deeply"
        else:
            why = f"the JSON body cannot be read: {type(cause).__name__}"
        return await request_validation_exception_handler(
            request, invalid(("body",), why, kind="json_invalid", value=None)
        )
    if exc.status_code == 405:
        # Starlette's Allow names the methods of the first route that matched the path only
        # (GET of /v1/runs, not POST): name every method the schema documents for it.
        methods = _documented_methods(request.app.openapi(), request.url.path)
        if methods:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(methods)}
    return await http_exception_handler(request, exc)


def _documented_methods(schema: dict[str, Any], path: str) -> list[str]:
    methods = set()
    for template, operations in schema.get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods |= {method.upper() for method in operations if method != "parameters"}
    if "GET" in methods:
        methods.add("HEAD")  # Starlette answers HEAD wherever it answers GET
    return sorted(methods)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)
