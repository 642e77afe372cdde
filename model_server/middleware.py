"""A pure ASGI body-size limit: cheap on the hot path, a JSON 413 past the limit."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                if int(value) > self.max_bytes:
                    await self._reject(send)
                    return
                # The server delivers exactly content-length bytes: nothing more to check.
                await self.app(scope, receive, send)
                return
        # No content-length (a chunked upload): read the body here, up to the limit, and hand
        # it on whole. Refusing it from inside the app's receive does not work: FastAPI turns
        # any exception raised while it reads a body into a 400 "error parsing the body".
        chunks = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: there is no one to answer
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()  # after the body: wait for the disconnect
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        body = orjson.dumps(
            {"detail": f"request body larger than {self.max_bytes} bytes (ENCORE_MAX_BODY_BYTES)"}
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
