"""Likes on the feedback page in a real browser (Debian's headless Chromium driven by Playwright,
against the real app serving a published run): a like stores exactly one row, also when the
network loses the request or the answers or the server answers 503 (the page retries with the
same event id); a refusal shows the server's reason; the keyboard alone is enough. Each list
shown sends one view, stored once with the version that chose the list, retried like a like, and
never in the way when it fails. The server, the browser and the page come from tests/browser.py."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.browser import (
    NAMES,
    WARM_USERS,
    Page,
    Server,
    is_feedback,
    items,
    like_button,
    look_up,
    shown_name,
)
from tests.browser import browser as browser  # fixtures, imported by name
from tests.browser import server as server
from tests.browser import ui as ui

pytestmark = pytest.mark.browser


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

    assert len(ui.like_bodies) == 1
    body = ui.like_bodies[0]
    assert body["user_id"] == user_id
    assert body["run_id"] == recs["run_id"]
    assert body["liked_playlist_id"] == liked
    assert body["shown_playlist_ids"] == ids
    rows = server.rows_of(body["event_id"])
    assert len(rows) == 1
    row = rows[0]
    assert (row.user_id, row.run_id, row.liked_playlist_id) == (user_id, recs["run_id"], liked)
    assert list(row.shown_playlist_ids) == ids
    assert server.rows_for(user_id, "like") == rows

    # Pressing Like again does nothing: the like is already stored (the button is
    # aria-disabled, which Playwright honours, so force the click through).
    like_button(ui, 1).click(force=True)
    page.wait_for_timeout(300)
    assert len(ui.like_bodies) == 1


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

    assert len(ui.like_bodies) == 2  # the aborted attempt and the retry
    assert len(ui.event_ids()) == 1
    (event_id,) = ui.event_ids()
    assert len(server.rows_of(event_id)) == 1
    assert len(server.rows_for(user_id, "like")) == 1


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
    assert len(ui.like_bodies) == 5
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
    assert len(ui.like_bodies) == 3
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
    assert len(ui.like_bodies) == 1  # a 4xx is not retried


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
    assert {b["liked_playlist_id"] for b in ui.like_bodies} == {first, second}


# ---- views --------------------------------------------------------------------------------


def test_a_shown_list_sends_one_view(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    user_id = WARM_USERS[7]
    recs = server.get(f"/v1/recommendations/{user_id}?n=5")
    page = ui.page
    look_up(ui, user_id, n=5)
    page.wait_for_timeout(300)  # a second view would have gone out by now
    assert len(ui.view_bodies) == 1
    body = ui.view_bodies[0]
    assert body == {
        "event_id": body["event_id"],
        "kind": "view",
        "user_id": user_id,
        "run_id": recs["run_id"],
        "shown_playlist_ids": recs["playlist_ids"],
    }
    (row,) = server.rows_of(body["event_id"])
    assert (row.kind, row.user_id, row.run_id) == ("view", user_id, recs["run_id"])
    assert row.liked_playlist_id is None
    assert list(row.shown_playlist_ids) == recs["playlist_ids"]
    assert row.model_version == server.chosen_by(user_id)
    assert row.experiment_id == server.experiment_id

    # A like is not another view; a new lookup of the same user is.
    like_button(ui, 0).click()
    expect(page.get_by_role("status")).to_contain_text("Saved: you liked")
    assert len(ui.view_bodies) == 1
    look_up(ui, user_id, n=5)
    assert len({b["event_id"] for b in ui.view_bodies}) == 2
    assert len(server.rows_for(user_id, "view")) == 2
    assert len(server.rows_for(user_id, "like")) == 1


def test_a_view_retried_after_503_is_stored_once(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    user_id = WARM_USERS[8]
    recs = server.get(f"/v1/recommendations/{user_id}")
    page = ui.page
    page.route(
        "**/v1/feedback",
        lambda route: route.fulfill(status=503, json={"detail": "feedback store down"}),
        times=2,
    )
    look_up(ui, user_id)  # waits for the view the server stores
    assert len(ui.view_bodies) == 3
    event_ids = {b["event_id"] for b in ui.view_bodies}
    assert len(event_ids) == 1
    (event_id,) = event_ids
    assert len(server.rows_of(event_id)) == 1
    assert server.rows_for(user_id, "view") == server.rows_of(event_id)
    expect(items(ui)).to_have_count(len(recs["playlist_ids"]))
    expect(page.get_by_role("status")).to_contain_text("Showing")
    expect(page.locator("#problem")).to_be_empty()


def test_a_lost_view_does_not_get_in_the_way(ui: Page, server: Server) -> None:
    """The views cannot get through at all: the list, its likes and the messages are as ever,
    and after its retries the view is given up without a word."""
    from playwright.sync_api import expect

    user_id = WARM_USERS[9]
    recs = server.get(f"/v1/recommendations/{user_id}")
    page = ui.page

    def no_views(route: Any) -> None:
        if is_feedback(route.request, "view"):
            route.abort("connectionreset")
        else:
            route.fallback()

    page.route("**/v1/feedback", no_views)
    look_up(ui, user_id, view=False)
    expect(items(ui)).to_have_count(len(recs["playlist_ids"]))
    liked = recs["playlist_ids"][0]
    like_button(ui, 0).click()
    saved = f"Saved: you liked “{shown_name(liked)}”."
    expect(page.get_by_role("status")).to_have_text(saved)

    deadline = time.monotonic() + 15
    while len(ui.view_bodies) < 4:  # one attempt and three automatic retries
        assert time.monotonic() < deadline, f"{len(ui.view_bodies)} view attempts in 15 s"
        page.wait_for_timeout(100)
    page.wait_for_timeout(500)
    assert len(ui.view_bodies) == 4
    expect(page.get_by_role("status")).to_have_text(saved)
    expect(page.locator("#problem")).to_be_empty()
    assert server.rows_for(user_id, "view") == []
    assert len(server.rows_for(user_id, "like")) == 1
