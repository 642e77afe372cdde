"""The feedback page's look-up in a real browser (Debian's headless Chromium driven by Playwright,
against the real app serving a published run): personal and popular picks, the model version
that chose the list (the champion's or the challenger's), names shown as text and never as HTML,
inline errors for a bad user id or count, the server's refusal shown, and nothing loaded from
elsewhere. The server, the browser and the page come from tests/browser.py."""

from __future__ import annotations

import re
import urllib.request

import pytest

from tests.browser import (
    NAMES,
    WARM_USERS,
    XSS,
    Page,
    Server,
    items,
    like_button,
    look_up,
    shown_name,
)
from tests.browser import browser as browser  # fixtures, imported by name
from tests.browser import server as server
from tests.browser import ui as ui

pytestmark = pytest.mark.browser


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


def test_the_page_shows_the_model_that_chose_the_list(ui: Page, server: Server) -> None:
    from playwright.sync_api import expect

    model = server.get("/v1/model")
    assert model["model_version"] == server.champion
    assert model["challenger"] == {
        "experiment_id": server.experiment_id,
        "version": server.challenger,
        "share": 0.5,
    }
    first_of: dict[str, int] = {}
    for user_id in WARM_USERS:
        first_of.setdefault(server.chosen_by(user_id), user_id)
    assert set(first_of) == {server.champion, server.challenger}

    page = ui.page
    expect(page.locator("#chosen-by")).to_be_hidden()
    for version, user_id in first_of.items():
        look_up(ui, user_id)
        expect(page.locator("#chosen-by")).to_be_visible()
        expect(page.locator("#chosen-by")).to_have_text(f"Chosen by model {version}")
        expect(page.locator("#chosen-by code")).to_have_text(version)
        expect(page.locator("#run-id")).to_have_text(model["run_id"])
        (view,) = server.rows_of(ui.view_bodies[-1]["event_id"])  # this lookup's view
        assert view.user_id == user_id
        assert (view.model_version, view.experiment_id) == (version, server.experiment_id)


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
