"""The OpenAPI schema, made to tell the truth about every answer the API can give.

FastAPI documents the 2xx answer and its own 422; the rest is added here, by rule, so that a
route cannot forget one: every error answer has the ``ErrorBody`` shape; a route with a
request body can answer 413 (``ENCORE_MAX_BODY_BYTES``); a route behind the bearer token
401; every ``/v1`` route 503 (a store is down), with ``Retry-After``. Route-specific codes
(404, 409) are declared on the routes themselves.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from model_server.errors import ErrorBody

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NUMERIC_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
DESCRIPTIONS = {
    401: "Missing or wrong bearer token (Authorization: Bearer $ENCORE_ADMIN_TOKEN)",
    413: "Request body larger than ENCORE_MAX_BODY_BYTES",
    422: "The request is invalid: detail lists each problem (loc, msg, type)",
    503: "A store is unavailable, or no run is published yet: component says which",
}
HEADERS = {
    401: {
        "WWW-Authenticate": {
            "description": "The authentication scheme to use: Bearer.",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    503: {
        "Retry-After": {
            "description": "Seconds to wait before trying again.",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


def install(app: FastAPI, *, top_n: int) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json`` and ``/docs``) the amended schema.

    ``top_n`` is the most playlists a request may ask for (``ENCORE_TOP_N``): the API
    refuses more, and the schema says so.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()  # FastAPI caches it in app.openapi_schema
            _document_errors(schema)
            _limit_n(schema, top_n)
            _exact_integers(schema)
        return app.openapi_schema

    app.openapi = openapi  # FastAPI's documented way to extend the schema


def _document_errors(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _, definitions = models_json_schema(
        [(ErrorBody, "serialization")], ref_template="#/components/schemas/{model}"
    )
    components.update(definitions["$defs"])
    for path, item in schema["paths"].items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            statuses = set()
            if "requestBody" in operation:
                statuses.add(413)
            if operation.get("security"):
                statuses.add(401)
            if path.startswith("/v1/"):
                statuses.add(503)
            for status in statuses:
                responses.setdefault(str(status), {})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400 and _generic(response):
                    code = int(status)
                    if response.get("description") in (None, "Validation Error"):
                        response["description"] = DESCRIPTIONS.get(code, "Error")
                    response["content"] = {"application/json": {"schema": dict(ERROR_REF)}}
                    if code in HEADERS:
                        response["headers"] = HEADERS[code]
            operation["responses"] = dict(sorted(responses.items()))
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)  # FastAPI's 422 shape, replaced by ErrorBody


def _generic(response: dict[str, Any]) -> bool:
    """An error response without a body of its own (a route may declare one: /readyz)."""
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return not schema or schema.get("$ref", "").endswith("/HTTPValidationError")


def _limit_n(schema: dict[str, Any], top_n: int) -> None:
    body = schema["components"]["schemas"]["RecommendationsRequest"]["properties"]["n"]
    query = next(
        parameter["schema"]
        for parameter in schema["paths"]["/v1/recommendations/{user_id}"]["get"]["parameters"]
        if parameter["name"] == "n"
    )
    for n in (body, query):
        for branch in n.get("anyOf", [n]):
            if branch.get("type") == "integer":
                branch["maximum"] = top_n
        n["description"] = (
            f"Playlists per user: 10 by default, at most {top_n} (ENCORE_TOP_N, the lists each "
            "run stores)."
        )


def _exact_integers(node: Any) -> None:
    """Integer bounds as JSON integers, exactly.

    FastAPI passes the schema through its own model, whose numeric keywords are floats:
    ``maximum: 2**63 - 1`` came out as ``9.223372036854776e+18`` (2**63 once rounded), a
    bound one past what the API takes, so a client that trusted it was refused.
    """
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in NUMERIC_KEYWORDS:
                value = node.get(key)
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                    if node.get("format") == "int64":
                        value = max(INT64_MIN, min(INT64_MAX, value))
                    node[key] = value
        for child in node.values():
            _exact_integers(child)
    elif isinstance(node, list):
        for child in node:
            _exact_integers(child)
