"""The ASGI entry point: `uvicorn model_server.main:app` (what `encore serve` runs)."""

from prometheus_fastapi_instrumentator import Instrumentator

from encore.metric_names import LATENCY_BUCKETS
from model_server.app import create_app

app = create_app()

Instrumentator(
    excluded_handlers=["/metrics"],
    should_group_untemplated=True,
).instrument(app, latency_lowr_buckets=LATENCY_BUCKETS).expose(app, include_in_schema=False)
