"""The pages in a real browser: headless Chromium (Debian's) driven by Playwright, against
the service served by granian as in production.

`/docs` renders and lists every route; on `/inbox`, a notification made through the API
appears without a reload within 2 s, reading one updates the badge, "Mark all read"
clears it, a second tab sees each change, and markup in `data` shows as text.

Without /usr/bin/chromium (`make test` installs it with apt-get when it can) these tests
are skipped, unless REQUIRE_BROWSER is set (.ci/run sets it): then they fail.
SCREENSHOTS_DIR=docs (`make screenshots`) writes the README's pictures.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MongoServer
from test_stream import Server, a_user, serve

from notification_service import tokens
from notification_service.config import Config
from notification_service.notification_handler import api
from notification_service.openapi import document

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
KEY = "browser-test-api-key-0123"
SECRET = "browser-test-user-token-secret-0123456789"
# How long a change may take to show without a reload before the test fails. The goal
# (2 s, p99 with 1,000 streams open) was measured by a benchmark
# (docs/measurements-history.md), not here: a timed assertion fails on a loaded CI
# machine for reasons the page does not have (it did, once, with the load average at 6).
# The time each took is printed.
APPEAR_SECONDS = 15.0

try:
    from playwright import sync_api

    missing = None if Path(CHROMIUM).exists() else f"no Chromium at {CHROMIUM}"
except ImportError:
    missing = "Playwright is not installed (pip install -e '.[test]')"
if missing is not None:
    if os.environ.get("REQUIRE_BROWSER"):
        raise RuntimeError(f"{missing}, and REQUIRE_BROWSER is set")
    pytest.skip(f"{missing}: `make test` installs Debian's chromium as root",
                allow_module_level=True)  # fmt: skip


# --- the service and the browser ----------------------------------------------------------


@pytest.fixture(scope="module")
def site(mongo_server: MongoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service as deployed for browsers: API keys, and user tokens for the pages."""
    log = tmp_path_factory.mktemp("browser") / "log"
    server = serve(mongo_server, log, API_KEYS=KEY, USER_TOKEN_SECRET=SECRET,
                   STREAM_HEARTBEAT_SECONDS="15")  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        # Debian's build, not one Playwright would download.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 900, "height": 640})
    yield context
    context.close()


def screenshot(page: Any, name: str, tmp_path: Path, width: int, height: int) -> Path:
    """Save a PNG of the page's top: in SCREENSHOTS_DIR when set (the README's), else tmp."""
    folder = Path(os.environ.get("SCREENSHOTS_DIR") or tmp_path)
    path = folder / name
    page.set_viewport_size({"width": width, "height": height})
    page.screenshot(path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def token_for(user: str, ttl: int = 600) -> str:
    return tokens.mint(SECRET.encode(), user, int(time.time()) + ttl)


def create(site: Server, user: str, data: dict[str, Any]) -> str:
    status, body, _ = site.call(
        "POST", "/create", {"user_id": user, "key": "new_post", "data": data},
        headers={"Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    assert status == 201, body
    notification_id: str = body["data"]["notification_id"]
    return notification_id


def open_inbox(context: Any, site: Server, query: str) -> Any:
    """A tab on /inbox, once its stream is open; it records console errors and marks its
    window, so that a reload would show."""
    page = context.new_page()
    page.errors = []  # type: ignore[attr-defined]
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    answer = page.goto(f"http://127.0.0.1:{site.port}/inbox?{query}")
    # The page itself, or what came instead (it once was not there under heavy load).
    assert answer is not None and answer.status == 200, answer and (answer.status, answer.text())
    page.wait_for_function(
        "() => (document.getElementById('status')?.textContent || '').startsWith('Live')"
    )
    page.evaluate("() => { window.sameDocument = true; }")
    return page


def badge(page: Any) -> str:
    """The unread badge as a person sees it: its number, or '' while it is hidden."""
    shown: str = page.evaluate(
        "(() => { const b = document.getElementById('badge'); return b.hidden ? '' : "
        "b.textContent; })()"
    )
    return shown


def wait_badge(page: Any, value: str) -> None:
    page.wait_for_function(
        "(value) => { const b = document.getElementById('badge'); "
        "return (b.hidden ? '' : b.textContent) === value; }",
        arg=value,
        timeout=APPEAR_SECONDS * 1000,
    )


def unread_ids(page: Any) -> list[str]:
    ids: list[str] = page.eval_on_selector_all(
        "#list li.unread", "els => els.map(e => e.dataset.id)"
    )
    return ids


# --- /docs ------------------------------------------------------------------------------


def test_docs_renders_and_lists_every_route(site: Server, context: Any, tmp_path: Path) -> None:
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{site.port}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=15_000)
    shown = {
        (method.strip().upper(), path.strip())
        for method, path in page.eval_on_selector_all(
            ".opblock",
            "els => els.map(e => [e.querySelector('.opblock-summary-method').textContent, "
            "e.querySelector('.opblock-summary-path').dataset.path])",
        )
    }
    doc = document(api.endpoints, Config())
    documented = {(m.upper(), p) for p, methods in doc["paths"].items() for m in methods}
    assert shown == documented
    assert "notification-service" in page.inner_text(".title")
    screenshot(page, "docs.png", tmp_path, 1100, 1500)


# --- /inbox -----------------------------------------------------------------------------


def test_a_new_notification_appears_without_reload_and_two_tabs_stay_in_step(
    site: Server, mongo_server: MongoServer, context: Any, tmp_path: Path
) -> None:
    user = a_user(mongo_server)
    query = f"token={token_for(user)}"
    first_tab, second_tab = open_inbox(context, site, query), open_inbox(context, site, query)
    assert badge(first_tab) == "" and first_tab.is_visible("#empty")

    made = []
    for title in ("Ada commented on your post", "New message from Grace", "Your export is ready"):
        started = time.monotonic()
        made.append(create(site, user, {"title": title}))
        for tab in (first_tab, second_tab):
            tab.wait_for_selector(f"#list li[data-id='{made[-1]}']", timeout=APPEAR_SECONDS * 1000)
        print(f"shown in both tabs {time.monotonic() - started:.2f} s after the create")
    for tab in (first_tab, second_tab):
        wait_badge(tab, "3")
        titles = tab.eval_on_selector_all("#list .title", "els => els.map(e => e.textContent)")
        assert titles[0] == "Your export is ready"  # the newest at the top
        assert not tab.is_visible("#empty")

    # Reading one in the first tab: both badges say 2, both show it read.
    first_tab.click(f"#list li[data-id='{made[1]}'] .title")
    for tab in (first_tab, second_tab):
        wait_badge(tab, "2")
        assert made[1] not in unread_ids(tab)
    screenshot(first_tab, "inbox.png", tmp_path, 900, 400)

    # Mark all read in the second: the badge goes on both.
    second_tab.click("#mark-all")
    for tab in (first_tab, second_tab):
        wait_badge(tab, "")
        tab.wait_for_function("() => document.querySelectorAll('#list li.unread').length === 0")

    # Delete in the first: gone from the second.
    first_tab.click(f"#list li[data-id='{made[0]}'] .delete")
    second_tab.wait_for_selector(f"#list li[data-id='{made[0]}']", state="detached",
                                 timeout=APPEAR_SECONDS * 1000)  # fmt: skip
    for tab in (first_tab, second_tab):
        assert tab.evaluate("() => window.sameDocument") is True  # never reloaded
        assert tab.errors == []


def test_markup_in_data_shows_as_text_and_runs_nothing(
    site: Server, mongo_server: MongoServer, context: Any
) -> None:
    user = a_user(mongo_server)
    page = open_inbox(context, site, f"token={token_for(user)}")
    hostile = (
        '<img src=x onerror="document.title=\'owned\'"><script>document.title="owned"</script>'
    )
    made = create(site, user, {"title": hostile, "body": "<b>bold</b>", "<i>key</i>": "x"})
    item = page.wait_for_selector(f"#list li[data-id='{made}']", timeout=APPEAR_SECONDS * 1000)
    assert item.query_selector(".title").text_content() == hostile
    assert "<b>bold</b>" in item.query_selector(".data").text_content()
    assert item.query_selector_all("img, script, b, i") == []
    page.wait_for_timeout(300)  # an image error handler would have run by now
    assert page.title() == "Inbox"
    assert page.errors == []


def test_the_page_refuses_a_token_for_another_user_and_says_why(
    site: Server, mongo_server: MongoServer, context: Any
) -> None:
    mine, theirs = a_user(mongo_server), a_user(mongo_server)
    create(site, theirs, {"title": "not yours"})
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{site.port}/inbox?user_id={theirs}&token={token_for(mine)}")
    # The token decides whose inbox: its own user's, empty.
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Live')")
    assert page.eval_on_selector_all("#list li", "els => els.length") == 0
    expired = tokens.mint(SECRET.encode(), mine, int(time.time()) - 1)
    page.goto(f"http://127.0.0.1:{site.port}/inbox#token={expired}")
    page.wait_for_selector("#status.error")
    assert re.search(r"token_expired|reload", page.inner_text("#status"))


def test_without_keys_the_page_calls_the_api_with_the_user_id(
    mongo_server: MongoServer, context: Any, tmp_path: Path
) -> None:
    server = serve(mongo_server, tmp_path / "log")  # make run's setting: no keys, no tokens
    try:
        user = a_user(mongo_server)
        page = open_inbox(context, server, f"user_id={user}")
        status, body, _ = server.call("POST", "/create",
                                      {"user_id": user, "key": "new_post", "data": {}})  # fmt: skip
        assert status == 201
        made = body["data"]["notification_id"]
        page.wait_for_selector(f"#list li[data-id='{made}']", timeout=APPEAR_SECONDS * 1000)
        assert page.inner_text(f"#list li[data-id='{made}'] .title") == "new_post"  # no title
        wait_badge(page, "1")
    finally:
        server.stop()


# The page's own /list calls answer a second late, as on a slow network or server.
SLOW_LIST = """
const realFetch = window.fetch;
window.fetch = (url, init) => String(url).includes("/list")
  ? new Promise((done) => setTimeout(done, 1000)).then(() => realFetch(url, init))
  : realFetch(url, init);
"""


def test_the_badge_never_counts_ahead_of_the_list_it_shows(
    site: Server, mongo_server: MongoServer, context: Any
) -> None:
    user = a_user(mongo_server)
    context.add_init_script(SLOW_LIST)
    page = open_inbox(context, site, f"token={token_for(user)}")
    made = [create(site, user, {"title": title}) for title in ("one", "two")]
    page.wait_for_function("() => document.querySelectorAll('#list li.unread').length === 2")
    wait_badge(page, "2")

    status, body, _ = site.call(
        "POST", "/read", {"user_id": user, "notification_id": made[0]},
        headers={"Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    assert status == 200, body
    # Sampled while the list is refetched: whatever the badge says, the rows say too.
    seen = set()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        shown, unread = page.evaluate(
            "() => [document.getElementById('badge').hidden ? '0' : "
            "document.getElementById('badge').textContent, "
            "document.querySelectorAll('#list li.unread').length]"
        )
        assert int(shown) == unread, (shown, unread)
        seen.add(unread)
        page.wait_for_timeout(50)
    assert seen >= {1}  # the change did arrive, with its list


def test_a_collapsed_thread_is_one_row_whose_count_grows_without_reload(
    site: Server, mongo_server: MongoServer, context: Any
) -> None:
    user = a_user(mongo_server)
    page = open_inbox(context, site, f"token={token_for(user)}")
    made = []
    for n in range(1, 4):
        status, body, _ = site.call(
            "POST", "/create",
            {"user_id": user, "key": "new_message", "collapse_key": "thread-7",
             "data": {"title": f"{n} new messages from Grace"}},
            headers={"Authorization": f"Bearer {KEY}"},
        )  # fmt: skip
        assert status == 201, body
        made.append(body["data"]["notification_id"])
        page.wait_for_function(
            "(n) => { const rows = document.querySelectorAll('#list li');"
            " return rows.length === 1 && rows[0].dataset.count === String(n); }",
            arg=n,
            timeout=APPEAR_SECONDS * 1000,
        )
    assert len(set(made)) == 1  # one notification, kept
    row = page.query_selector(f"#list li[data-id='{made[0]}']")
    assert row is not None
    assert row.query_selector(".count").text_content() == "\u00d73"  # times 3
    assert "3 new messages from Grace" in row.query_selector(".title").text_content()
    wait_badge(page, "1")  # one unread row, however many messages it holds
    assert page.evaluate("() => window.sameDocument") is True
    assert page.errors == []


def test_the_preferences_panel_saves_a_toggle_and_keeps_mandatory_ones_on(
    site: Server, mongo_server: MongoServer, context: Any
) -> None:
    user = a_user(mongo_server)
    page = open_inbox(context, site, f"token={token_for(user)}")
    page.click("#prefs summary")
    page.wait_for_selector("#prefs input[data-key='new_post'][data-channel='in_app']")
    mandatory = page.query_selector("#prefs input[data-key='new_login'][data-channel='email']")
    assert mandatory is not None and mandatory.is_disabled() and mandatory.is_checked()
    # new_post does not email: no toggle for a channel it does not use.
    assert page.query_selector("#prefs input[data-key='new_post'][data-channel='email']") is None

    page.uncheck("#prefs input[data-key='new_post'][data-channel='in_app']")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('Saved')"
    )
    status, body, _ = site.call(
        "GET", f"/preferences?user_id={user}", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert status == 200, body
    assert body["data"]["keys"]["new_post"] == {"in_app": False, "mandatory": False}
    # And a create honours it: nothing reaches the inbox the page shows.
    status, body, _ = site.call(
        "POST", "/create", {"user_id": user, "key": "new_post", "data": {}},
        headers={"Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    assert status == 200 and body["data"]["skipped"] == ["in_app"], body
    assert page.eval_on_selector_all("#list li", "els => els.length") == 0
    assert page.errors == []
