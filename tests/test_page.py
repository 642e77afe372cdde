"""The feedback page in a real browser: Debian's headless Chromium driven by Playwright, against
the real app (uvicorn in a thread) serving a published run of a random bundle."""

from __future__ import annotations

import json
import os
import re
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

from tests.conftest import store_env

pytestmark = pytest.mark.browser

IN_CI = os.environ.get("CI", "").lower() == "true"
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

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def feedback_rows(self) -> list[Any]:
        from encore.database import open_database

        with open_database(self.settings) as db:
            chunks = db.feedback_since(datetime(2000, 1, 1, tzinfo=UTC))
            return [event for chunk in chunks for event in chunk]

    def rows_of(self, event_id: str) -> list[Any]:
        return [e for e in self.feedback_rows() if str(e.event_id) == event_id]

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
            build_random_bundle(
                settings.bundles_dir,
                users=USERS,
                playlists=PLAYLISTS,
                candidates=20,
                dim=16,
                names=NAMES,
                cold_every=COLD_EVERY,
            )
            record = run_full(settings)
            assert record.status == "published", record

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
            yield Server(f"http://127.0.0.1:{port}", settings)
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
    feedback_bodies: list[dict]
    dialogs: list[str]
    errors: list[str]

    def event_ids(self) -> set[str]:
        return {body["event_id"] for body in self.feedback_bodies}


@pytest.fixture
def ui(browser: Any, server: Server) -> Iterator[Page]:
    context = browser.new_context(base_url=server.url, viewport={"width": 900, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    seen = Page(page, [], [], [], [])

    def on_request(request: Any) -> None:
        if "/v1/" in request.url:
            seen.api_requests.append(request)
            if request.method == "POST" and request.url.endswith("/v1/feedback"):
                seen.feedback_bodies.append(json.loads(request.post_data))

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


def look_up(ui: Page, user_id: int | str, n: int | None = None) -> None:
    from playwright.sync_api import expect

    page = ui.page
    page.get_by_label("User id").fill(str(user_id))
    if n is not None:
        page.get_by_label("How many").fill(str(n))
    page.get_by_role("button", name="Show playlists").click()
    expect(page.get_by_role("status")).to_contain_text(f"for user {user_id}")


def items(ui: Page) -> Any:
    return ui.page.locator("#playlists > li")


def like_button(ui: Page, index: int) -> Any:
    """The button of the list's ``index``-th playlist (a random bundle may list one twice)."""
    return items(ui).nth(index).get_by_role("button")


# ---- tests --------------------------------------------------------------------------------


def test_like_a_playlist_stores_exactly_one_row(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    user_id, recs = server.user_with(lambda ids: any(p not in NAMES for p in ids), start=10, n=8)
    page = ui.page
    expect(page).to_have_title(re.compile("Encore"))
    look_up(ui, user_id, n=8)

    ids = recs["playlist_ids"]
    expect(items(ui)).to_have_count(len(ids))
    expect(page.locator("#playlists .playlist-name")).to_have_text([shown_name(p) for p in ids])
    expect(page.locator("#source")).to_have_text("Personal picks")
    expect(page.locator("#run-id")).to_have_text(recs["run_id"])
    expect(page.locator("#model-version")).to_have_text(recs["model_version"])
    assert page.locator("ol#playlists").count() == 1  # a semantic, ordered list

    liked = ids[1]
    like_button(ui, 1).click()
    expect(page.get_by_role("status")).to_have_text(f"Saved: you liked “{shown_name(liked)}”.")
    expect(like_button(ui, 1)).to_have_attribute("aria-pressed", "true")
    expect(like_button(ui, 1)).to_have_text(re.compile("^Liked"))

    assert len(ui.feedback_bodies) == 1
    body = ui.feedback_bodies[0]
    assert body["user_id"] == user_id
    assert body["run_id"] == recs["run_id"]
    assert body["liked_playlist_id"] == liked
    assert body["shown_playlist_ids"] == ids
    rows = server.rows_of(body["event_id"])
    assert len(rows) == 1
    row = rows[0]
    assert (row.user_id, row.run_id, row.liked_playlist_id) == (user_id, recs["run_id"], liked)
    assert list(row.shown_playlist_ids) == ids
    assert [r for r in server.feedback_rows() if r.user_id == user_id] == rows

    # Pressing Like again does nothing: the like is already stored (the button is
    # aria-disabled, which Playwright honours, so force the click through).
    like_button(ui, 1).click(force=True)
    page.wait_for_timeout(300)
    assert len(ui.feedback_bodies) == 1


def test_names_are_text_not_html(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    user_id, recs = server.user_with(lambda ids: any(NAMES.get(p) == XSS for p in ids), start=20)
    page = ui.page
    look_up(ui, user_id)
    hostile = [i for i, p in enumerate(recs["playlist_ids"]) if NAMES.get(p) == XSS]
    expect(items(ui)).to_have_count(len(recs["playlist_ids"]))
    for index in hostile:
        expect(items(ui).nth(index).locator(".playlist-name")).to_have_text(XSS)
    like_button(ui, hostile[0]).click()
    expect(page.get_by_role("status")).to_have_text(f"Saved: you liked “{XSS}”.")
    page.wait_for_timeout(500)  # an injected <img> would have fired onerror by now
    assert page.locator("img").count() == 0
    assert ui.dialogs == []
    assert page.evaluate("document.querySelectorAll('[onerror]').length") == 0


def test_network_error_is_retried_with_the_same_event_id(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    user_id = WARM_USERS[1]
    recs = server.get(f"/v1/recommendations/{user_id}")
    page = ui.page
    look_up(ui, user_id)
    page.route("**/v1/feedback", lambda route: route.abort("connectionreset"), times=1)
    liked = recs["playlist_ids"][0]
    like_button(ui, 0).click()
    expect(page.get_by_role("status")).to_have_text(f"Saved: you liked “{shown_name(liked)}”.")

    assert len(ui.feedback_bodies) == 2  # the aborted attempt and the retry
    assert len(ui.event_ids()) == 1
    (event_id,) = ui.event_ids()
    assert len(server.rows_of(event_id)) == 1
    assert len([r for r in server.feedback_rows() if r.user_id == user_id]) == 1


def test_lost_answers_then_retry_button_store_one_row(ui: Page, server: Server) -> None:
    """The server stores the first attempt but its answer is lost, later attempts cannot get
    through; after the automatic retries the page offers Retry, which reuses the event id."""
    from playwright.sync_api import expect

    user_id = WARM_USERS[3]
    recs = server.get(f"/v1/recommendations/{user_id}")
    page = ui.page
    look_up(ui, user_id)
    attempts = []

    def flaky(route: Any) -> None:
        attempts.append(route.request.url)
        if len(attempts) == 1:
            route.fetch()  # reaches the server, which stores the like
        route.abort("connectionreset")

    page.route("**/v1/feedback", flaky)
    liked = recs["playlist_ids"][2]
    like_button(ui, 2).click()
    retry = like_button(ui, 2)
    expect(retry).to_have_text(re.compile("^Retry"), timeout=20_000)
    expect(page.get_by_role("alert")).to_contain_text("could not be reached")
    assert len(attempts) == 4  # one attempt and three automatic retries

    page.unroute("**/v1/feedback")
    retry.click()
    expect(page.get_by_role("status")).to_have_text(f"Saved: you liked “{shown_name(liked)}”.")
    assert len(ui.feedback_bodies) == 5
    assert len(ui.event_ids()) == 1
    (event_id,) = ui.event_ids()
    assert len(server.rows_of(event_id)) == 1


def test_503_is_retried(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    user_id, recs = WARM_USERS[4], server.get(f"/v1/recommendations/{WARM_USERS[4]}")
    page = ui.page
    look_up(ui, user_id)
    page.route(
        "**/v1/feedback",
        lambda route: route.fulfill(status=503, json={"detail": "feedback store down"}),
        times=2,
    )
    liked = recs["playlist_ids"][0]
    like_button(ui, 0).click()
    expect(page.get_by_role("status")).to_have_text(f"Saved: you liked “{shown_name(liked)}”.")
    assert len(ui.feedback_bodies) == 3
    (event_id,) = ui.event_ids()
    assert len(server.rows_of(event_id)) == 1


def test_rejected_like_shows_the_servers_reason(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    page = ui.page
    look_up(ui, WARM_USERS[5])
    page.route(
        "**/v1/feedback",
        lambda route: route.fulfill(status=422, json={"detail": "run_id is not a run"}),
    )
    like_button(ui, 0).click()
    expect(page.get_by_role("alert")).to_contain_text("refused: run_id is not a run")
    assert len(ui.feedback_bodies) == 1  # a 4xx is not retried


def test_keyboard_only(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    user_id = WARM_USERS[6]
    recs = server.get(f"/v1/recommendations/{user_id}")
    page = ui.page
    keyboard = page.keyboard
    keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "user-id"
    keyboard.type(str(user_id))
    keyboard.press("Enter")
    expect(page.get_by_role("status")).to_contain_text(f"for user {user_id}")
    expect(items(ui)).to_have_count(len(recs["playlist_ids"]))

    for _ in range(10):  # count, Show playlists, then the first Like
        keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('like')"):
            break
    else:
        raise AssertionError("Tab never reached a Like button")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), "the focused button has no visible focus"
    keyboard.press("Enter")
    first = recs["playlist_ids"][0]
    expect(page.get_by_role("status")).to_have_text(f"Saved: you liked “{shown_name(first)}”.")
    # The button keeps focus (it is aria-disabled, not disabled) and says it is liked.
    assert page.evaluate("document.activeElement.getAttribute('aria-pressed')") == "true"
    keyboard.press("Tab")
    keyboard.press("Space")
    second = recs["playlist_ids"][1]
    expect(page.get_by_role("status")).to_have_text(f"Saved: you liked “{shown_name(second)}”.")
    assert {b["liked_playlist_id"] for b in ui.feedback_bodies} == {first, second}


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "-3", "1.5", "4e2", "12 34", "9223372036854775808"],
)
def test_bad_user_id_is_an_inline_error(ui: Page, bad: str) -> None:
    from playwright.sync_api import expect

    page = ui.page
    field = page.get_by_label("User id")
    field.fill(bad)
    field.press("Enter")
    error = page.locator("#user-id-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(re.compile("user id", re.I))
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_be_focused()
    assert "user-id-error" in (field.get_attribute("aria-describedby") or "")
    page.wait_for_timeout(200)
    assert ui.api_requests == []
    expect(page.locator("#results")).to_be_hidden()
    # Editing clears the error; a good id then works.
    field.fill("7")
    expect(error).to_be_hidden()


def test_bad_count_is_an_inline_error(ui: Page) -> None:
    from playwright.sync_api import expect

    page = ui.page
    page.get_by_label("User id").fill("14")
    page.get_by_label("How many").fill("0")
    page.get_by_role("button", name="Show playlists").click()
    expect(page.locator("#count-error")).to_contain_text("from 1 to 20")
    page.get_by_label("How many").fill("21")  # the run stores the top 20
    page.get_by_role("button", name="Show playlists").click()
    expect(page.locator("#count-error")).to_contain_text("from 1 to 20")
    expect(page.locator("#count-hint")).to_have_text("Between 1 and 20.")
    assert ui.api_requests == []


def test_unknown_and_cold_users_get_the_popular_list(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    page = ui.page
    for user_id in (5, 7, 10**18 + 1):  # not a user; a user with no candidates; a big id
        recs = server.get(f"/v1/recommendations/{user_id}")
        assert recs["source"] == "fallback"
        look_up(ui, user_id)
        expect(page.locator("#source")).to_have_text("Popular picks")
        expect(page.locator("#source-note")).to_contain_text("most popular")
        expect(page.locator("#playlists .playlist-name")).to_have_text(
            [shown_name(p) for p in recs["playlist_ids"]]
        )
    look_up(ui, WARM_USERS[0])
    expect(page.locator("#source")).to_have_text("Personal picks")


def test_server_refusal_of_n_is_shown(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    page = ui.page
    # A page that could not learn the run's top-n leaves the upper bound to the server.
    page.route("**/v1/model", lambda route: route.abort("connectionreset"))
    page.reload()
    page.get_by_label("User id").fill("14")
    page.get_by_label("How many").fill("150")  # the run stores the top 20
    page.get_by_role("button", name="Show playlists").click()
    expect(page.get_by_role("alert")).to_contain_text("n must be between 1 and 20")


def test_page_loads_nothing_from_elsewhere(ui: Page, server: Server) -> None:
    html = urllib.request.urlopen(server.url + "/", timeout=10).read().decode()
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    for asset in ("/static/app.js", "/static/style.css"):
        text = urllib.request.urlopen(server.url + asset, timeout=10).read().decode()
        assert "http://" not in text and "https://" not in text
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text
