"""Request bodies of the HTTP API. Ids are strict integers: "12", 1.5 and true are refused."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

MAX_ID = 2**63 - 1
MAX_USERS = 1000

Id = Annotated[StrictInt, Field(ge=0, le=MAX_ID)]


class RecommendationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_ids: list[Id] = Field(min_length=1, max_length=MAX_USERS)
    n: Annotated[StrictInt, Field(ge=1)] | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: uuid.UUID
    user_id: Id
    run_id: str = Field(min_length=1, max_length=128)
    liked_playlist_id: Id
    shown_playlist_ids: list[Id] = Field(max_length=1000)


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["manual", "backfill"] = "manual"
    user_ids: list[Id] | None = Field(
        None,
        min_length=1,
        max_length=1_000_000,
        description="Backfill only these users into the current run (omit for every user).",
    )
