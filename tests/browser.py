"""Shared by the feedback page's browser tests (test_page_lookup.py and test_page_likes.py): the
real app (uvicorn in a thread) serving a published run of a random bundle whose playlist names
include hostile and unusual text, with an experiment running (a second random bundle, the
challenger, chooses half of the users' lists), Debian's headless Chromium driven by Playwright,
and the page's controls. Its fixtures (``server``, ``browser``, ``ui``) are imported by name."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, store_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

USERS = 40
PLAYLISTS = 60
COLD_EVERY = 8  # user codes 0, 8, 16, ... have no candidates: user ids 7, 63, 119, ...
XSS = "<img src=x onerror=alert(1)>"
WORDS = ["Late-night jazz", "Rock & roll “classics”", "Café del Mar / 夜", "Focus  (deep)"]


def _name(pid: int) -> str | None:
    if pid % 9 == 0:
        return None  # not in the catalog: the page shows "Playlist <id>"
    if pid % 11 == 5:
        return XSS
    return f"{WORDS[pid % len(WORDS)]} #{pid}"


NAMES = {pid: name for pid in range(1, PLAYLISTS + 1) if (name := _name(pid)) is not None}
WARM_USERS = [7 * (code + 1) for code in range(USERS) if code % COLD_EVERY]


def _missing(message: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def shown_name(pid: int) -> str:
    return NAMES.get(pid) or f"Playlist {pid}"


# ---- the server ---------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    settings: Any  # encore.settings.Settings
    experiment_id: str
    champion: str
    challenger: str

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def chosen_by(self, user_id: int) -> str:
        """The version that chose the user's list: its element's in a POST, where the element
        and the run's (the champion's) model_version are separate keys."""
        request = urllib.request.Request(
            self.url + "/v1/recommendations",
            data=json.dumps({"user_ids": [user_id]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            (element,) = json.load(response)["recommendations"]
        return element["model_version"]

    def feedback_rows(self) -> list[Any]:
        from encore.database import open_database

        with open_database(self.settings) as db:
            chunks = db.feedback_since(datetime(2000, 1, 1, tzinfo=UTC))
            return [event for chunk in chunks for event in chunk]

    def rows_of(self, event_id: str) -> list[Any]:
        return [e for e in self.feedback_rows() if str(e.event_id) == event_id]

    def rows_for(self, user_id: int, kind: str) -> list[Any]:
        return [e for e in self.feedback_rows() if e.user_id == user_id and e.kind == kind]

    def user_with(
        self, wanted: Callable[[list[int]], bool], *, start: int, n: int = 10
    ) -> tuple[int, dict]:
        """The first user from ``WARM_USERS[start]`` on whose list has what a test needs."""
        for user_id in WARM_USERS[start:]:
            recs = self.get(f"/v1/recommendations/{user_id}?n={n}")
            if wanted(recs["playlist_ids"]):
                return user_id, recs
        raise AssertionError("no user's list has what the test needs; change the seed or sizes")


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("redis+postgres", marks=pytest.mark.integration)],
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One published run and one app per stack (the run takes 10-20 s).

    Its environment is set only while it starts; the app keeps its Settings object (and the
    settings dependency is pinned to it), so the per-test ENCORE_HOME of conftest does not
    reach it. The stores (a Redis prefix, a Postgres database) live until the module ends.
    """
    import uvicorn

    from encore.database import open_database
    from encore.experiments import Experiment, new_experiment_id
    from encore.settings import get_settings
    from model_server.app import create_app
    from scheduler.job import run_full
    from tests.random_bundle import build_random_bundle

    home = tmp_path_factory.mktemp("page") / "home"
    with store_env(request.param) as stores:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ENCORE_HOME", str(home))
            mp.setenv("ENCORE_WORKERS", "2")
            mp.delenv("ENCORE_REDIS_URL", raising=False)
            mp.delenv("ENCORE_DATABASE_URL", raising=False)
            for key, value in stores.items():
                mp.setenv(key, value)
            get_settings.cache_clear()
            settings = get_settings()
            with open_database(settings) as db:
                db.upgrade()  # what `encore db upgrade` does
            shape = dict(
                users=USERS,
                playlists=PLAYLISTS,
                candidates=20,
                dim=16,
                names=NAMES,
                cold_every=COLD_EVERY,
            )
            champion = build_random_bundle(settings.bundles_dir, **shape)
            challenger = build_random_bundle(
                settings.bundles_dir, **shape, version="challenger", seed=1, promote_it=False
            )
            experiment = Experiment(
                new_experiment_id(),
                champion.version,
                challenger.version,
                0.5,
                started_at=datetime.now(UTC),
            )
            with open_database(settings) as db:
                db.start_experiment(experiment)  # the run scores the challenger's users with it
            record = run_full(settings)
            assert record.status == "published", record
            assert record.experiment_id == experiment.experiment_id, record

            app = create_app()
            app.dependency_overrides[get_settings] = lambda: settings
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
            thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
            thread.start()
            deadline = time.monotonic() + 30
            while not uv.started:
                assert thread.is_alive(), "the server thread died while starting"
                assert time.monotonic() < deadline, "the server did not start in 30 s"
                time.sleep(0.05)
            get_settings.cache_clear()
        try:
            yield Server(
                f"http://127.0.0.1:{port}",
                settings,
                experiment.experiment_id,
                champion.version,
                challenger.version,
            )
        finally:
            uv.should_exit = True
            thread.join(timeout=15)
            sock.close()


# ---- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _missing(f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000
            )
        except Error as exc:
            _missing(f"Chromium at {CHROMIUM} does not start: {exc}")
        yield browser
        browser.close()


@dataclass
class Page:
    page: Any  # playwright.sync_api.Page
    api_requests: list[Any]
    like_bodies: list[dict]  # every attempt to send a like, retries included
    view_bodies: list[dict]  # the same for views
    dialogs: list[str]
    errors: list[str]

    def event_ids(self) -> set[str]:
        """The likes' event ids."""
        return {body["event_id"] for body in self.like_bodies}


@pytest.fixture
def ui(browser: Any, server: Server) -> Iterator[Page]:
    context = browser.new_context(base_url=server.url, viewport={"width": 900, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    seen = Page(page, [], [], [], [], [])

    def on_request(request: Any) -> None:
        if "/v1/" in request.url:
            seen.api_requests.append(request)
            if is_feedback(request):
                body = json.loads(request.post_data)
                kind = body.get("kind", "like")
                (seen.view_bodies if kind == "view" else seen.like_bodies).append(body)

    def on_dialog(dialog: Any) -> None:
        seen.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("request", on_request)
    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
    with page.expect_response("**/v1/model"):  # the page learns the run's top-n first
        page.goto("/")
    seen.api_requests.clear()
    yield seen
    context.close()
    assert seen.errors == [], f"JavaScript errors on the page: {seen.errors}"


def is_feedback(request: Any, kind: str | None = None) -> bool:
    if request.method != "POST" or not request.url.endswith("/v1/feedback"):
        return False
    return kind is None or json.loads(request.post_data).get("kind", "like") == kind


def stored(response: Any) -> bool:
    """A view the server accepted (201 stored, 200 already stored)."""
    return is_feedback(response.request, "view") and response.status in (200, 201)


def look_up(ui: Page, user_id: int | str, n: int | None = None, *, view: bool = True) -> None:
    """Look the user up; with ``view``, also wait until the server has the shown list's view,
    so that a test's later routing of /v1/feedback meets its likes only."""
    from playwright.sync_api import expect

    page = ui.page
    page.get_by_label("User id").fill(str(user_id))
    if n is not None:
        page.get_by_label("How many").fill(str(n))
    button = page.get_by_role("button", name="Show playlists")
    if view:
        with page.expect_response(stored):
            button.click()
    else:
        button.click()
    expect(page.get_by_role("status")).to_contain_text(f"for user {user_id}")


def items(ui: Page) -> Any:
    return ui.page.locator("#playlists > li")


def like_button(ui: Page, index: int) -> Any:
    """The button of the list's ``index``-th playlist (a random bundle may list one twice)."""
    return items(ui).nth(index).get_by_role("button")
