"""Dependencies of the routes, as Annotated aliases."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPBearer

from encore.settings import Settings, get_settings
from model_server.state import ServingState


async def get_state(request: Request) -> ServingState:
    # async: FastAPI runs a plain ``def`` dependency in a worker thread, a hop per request.
    return request.app.state.serving


class _AdminBearer(HTTPBearer):
    """The bearer scheme, declared in the OpenAPI schema (so clients and tools know it).

    Returns the header as sent: :func:`require_admin` compares it exactly, where
    HTTPBearer's own parsing would strip the spaces around the token.
    """

    async def __call__(self, request: Request) -> str | None:  # type: ignore[override]
        return request.headers.get("Authorization")


admin_bearer = _AdminBearer(
    auto_error=False,
    scheme_name="bearer",
    description="ENCORE_ADMIN_TOKEN, as `Authorization: Bearer <token>`.",
)


def require_admin(
    settings: Annotated[Settings, Depends(get_settings)],
    authorization: Annotated[str | None, Security(admin_bearer)] = None,
) -> None:
    challenge = {"WWW-Authenticate": "Bearer"}
    if settings.admin_token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "admin routes are disabled: set ENCORE_ADMIN_TOKEN on the server",
            headers=challenge,
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.encode(), settings.admin_token.get_secret_value().encode()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer $ENCORE_ADMIN_TOKEN)",
            headers=challenge,
        )


StateDep = Annotated[ServingState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
AdminDep = Annotated[None, Depends(require_admin)]
