"""Request bodies of the HTTP API. Ids are integers: "12", 1.5 and true are refused; 12.0 is
12 (JSON Schema's integer), up to 2**53, where floats stop being exact."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
)

MAX_ID = 2**63 - 1
MAX_USERS = 1000

# Integral floats are exact up to here: 2**53 + 1 has no float of its own.
EXACT_FLOAT_MAX = 2**53


def _whole_number(value: object) -> object:
    # The schema's "integer" (JSON Schema 2020-12, OpenAPI 3.1) includes 14.0: take it as 14
    # where a float holds the integer exactly; strings, booleans, 1.5 stay refused (int_type).
    if type(value) is float and value.is_integer() and abs(value) <= EXACT_FLOAT_MAX:
        return int(value)
    return value


# int64 in the schema: the range is what a client's code generator needs to pick a type.
Id = Annotated[
    StrictInt,
    Field(
        ge=0,
        le=MAX_ID,
        description="A non-negative 64-bit id. Written with a fraction (12.0) it is taken up "
        "to 2^53 only: past that a JSON parser's float no longer holds it exactly.",
        json_schema_extra={"format": "int64"},
    ),
    BeforeValidator(_whole_number),
]


class RecommendationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_ids: list[Id] = Field(min_length=1, max_length=MAX_USERS)
    n: Annotated[StrictInt, Field(ge=1), BeforeValidator(_whole_number)] | None = None


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: uuid.UUID
    user_id: Id
    run_id: str = Field(min_length=1, max_length=128)
    shown_playlist_ids: list[Id] = Field(max_length=1000)


class LikeEvent(_Event):
    """A playlist liked in a list that was shown (the default kind)."""

    model_config = ConfigDict(title="Like")

    kind: Literal["like"] = "like"
    liked_playlist_id: Id


class ViewEvent(_Event):
    """A list shown to the user: what an experiment's like rate is measured against."""

    model_config = ConfigDict(title="View")

    kind: Literal["view"]

    @property
    def liked_playlist_id(self) -> None:
        return None


def _kind_or(default: str):
    """A discriminator reading ``kind``, which a body may leave out for ``default``."""

    def kind(value: object) -> object:
        if isinstance(value, dict):
            return value.get("kind", default)
        return getattr(value, "kind", default)

    return kind


FeedbackRequest = Annotated[
    Annotated[LikeEvent, Tag("like")] | Annotated[ViewEvent, Tag("view")],
    # A missing kind is a like: the events sent before views existed stay valid.
    Discriminator(_kind_or("like")),
]


class ManualRun(BaseModel):
    """A full run of every user (the default)."""

    model_config = ConfigDict(extra="forbid", title="Full run")

    kind: Literal["manual"] = "manual"


class BackfillRun(BaseModel):
    """Some users rescored into the served run; without ``user_ids``, a full run."""

    model_config = ConfigDict(extra="forbid", title="Backfill")

    kind: Literal["backfill"]
    user_ids: list[Id] | None = Field(
        None,
        min_length=1,
        max_length=1_000_000,
        description="Backfill only these users into the current run (omit for every user).",
    )


RunRequest = Annotated[
    Annotated[ManualRun, Tag("manual")] | Annotated[BackfillRun, Tag("backfill")],
    # A missing kind is a full run: `{}` is a valid request.
    Discriminator(_kind_or("manual")),
]
