"""The studio under its Content-Security-Policy, its PNG drop under the bounds of ``lmd info``, and
where it keeps the API key, in a real browser (Debian's Chromium, Playwright) against a real
``lmd serve`` (no workers needed).
"""

from __future__ import annotations

import base64
import io
import shutil
import time

import pytest
from PIL import Image

from grounded_sd.image_parameters import Conditioning, ImageParameters
from layout_planner.layout import Layout
from tests.cli.test_cli_info import HOSTILE
from tests.support.service import APIProcess, service_settings, settings_env

pytestmark = pytest.mark.slow

# Recorded before any script of the page runs: every CSP violation the page causes.
WATCH_CSP = """window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));"""
DROP = """([data, name]) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, {type: "image/png"}));
    document.getElementById("editor-wrap").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
}"""


@pytest.fixture(scope="module")
def api(private_redis, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("studio-policy")
    process = APIProcess(settings_env(service_settings(private_redis.url, tmp / "data")), tmp / "api.log").wait_ready()
    try:
        yield process
    finally:
        process.stop()


KEY = "policy-key"


@pytest.fixture(scope="module")
def keyed_api(private_redis, tmp_path_factory):
    """A second ``lmd serve`` on the same Redis, with an API key: the page must ask for it."""
    tmp = tmp_path_factory.mktemp("studio-key")
    settings = service_settings(private_redis.url, tmp / "data", api_keys=[KEY])
    process = APIProcess(settings_env(settings), tmp / "api.log").wait_ready()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/test installs Debian's package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(api, browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.add_init_script(WATCH_CSP)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{api.base_url}/")
    # (Playwright's string predicates poll with eval, which this policy refuses: locators and
    # Python-side polling only, here and in the tests)
    page.locator("#hint-size").filter(has_text="px").wait_for()  # /limits read
    yield page
    context.close()
    assert not errors, errors


def _poll(page, expression: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, expression
        time.sleep(0.05)


def _drop(page, content: bytes, name: str = "dropped.png") -> None:
    page.evaluate(DROP, [base64.b64encode(content).decode(), name])


def test_the_studio_works_under_its_policy_and_a_dropped_png_restores_its_layout(page):
    layout = Layout.model_validate({"objects": [{"id": "lamp", "phrase": "a red lamp", "box": [0.1, 0.2, 0.3, 0.9]}]})
    params = ImageParameters(prompt="a red lamp", layout=layout, seed=9, steps=12, guidance_scale=7.5, width=96,
                             height=64, variant="lmd", preset="fast", model="m", scheduler="DDIMScheduler",
                             conditioning=Conditioning(prompt="p", negative_prompt="n"))
    png = io.BytesIO()
    Image.new("RGB", (96, 64)).save(png, format="PNG", pnginfo=params.png_info())
    _drop(page, png.getvalue(), "lamp.png")
    page.wait_for_selector("#editor .box[data-id=lamp]")  # drawn with the styles the script sets
    page.click("#add-box")
    assert page.input_value("#seed") == "9"
    assert page.evaluate("window.__violations") == []
    # the policy is really enforced: an inline script is refused and reported
    page.evaluate("""() => { const s = document.createElement("script"); s.textContent = "window.__ran = 1";
                             document.body.appendChild(s); }""")
    _poll(page, "window.__violations.length > 0")
    assert page.evaluate("window.__ran") is None


@pytest.mark.parametrize("name", ["deeply nested JSON", "an oversized text chunk", "endless empty chunks",
                                  "a cut file", "not a PNG"])
def test_a_hostile_png_dropped_on_the_studio_is_one_plain_alert(page, name):
    _drop(page, HOSTILE[name][0], "hostile.png")
    page.locator("#alert").filter(has_text="hostile.png").wait_for()
    text = page.inner_text("#alert")
    assert "could not be read" in text and len(text) < 300, text


# ------------------------------------------------------------------------- where the key is kept ------
STORED = "() => [sessionStorage.getItem('lmd.apiKey'), localStorage.getItem('lmd.apiKey')]"


def _open(context, api) -> tuple:
    """A new tab on the studio, once its start is done: (the page, whether it asked for the key)."""
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.add_init_script(WATCH_CSP)
    page.goto(f"{api.base_url}/")
    return page, _asked(page)


def _asked(page) -> bool:
    """Whether the page, its start done, asks for the key (it does when none is stored)."""
    page.locator("body[data-ready=true]").wait_for(state="attached")
    return page.locator("#key-dialog").evaluate("d => d.open")


def _save_key(page, remember: bool) -> None:
    """Type the key into the open dialog and save it; the gallery's GET /sessions then succeeds."""
    page.fill("#key-input", KEY)
    page.set_checked("#key-remember", remember)
    with page.expect_response(lambda r: "/sessions" in r.url) as answer:
        page.click("#key-save")
    assert answer.value.status == 200
    assert page.evaluate("window.__violations") == []


def test_the_key_stays_in_its_tab_unless_remembered(keyed_api, browser):
    context = browser.new_context()
    page, asked = _open(context, keyed_api)
    assert asked and not page.is_checked("#key-remember")  # not remembered unless the user says so
    _save_key(page, remember=False)
    assert page.evaluate(STORED) == [KEY, None]
    with page.expect_response(lambda r: "/sessions" in r.url) as answer:
        page.reload()  # the same tab keeps it
    assert answer.value.status == 200 and not _asked(page)
    other_tab, asked = _open(context, keyed_api)
    assert asked and other_tab.evaluate(STORED) == [None, None]  # another tab of the same browser has no key
    page.evaluate("() => sessionStorage.clear()")
    page.reload()
    assert _asked(page)  # the tab's storage cleared: asked again
    context.close()
    fresh = browser.new_context()
    assert _open(fresh, keyed_api)[1]
    fresh.close()


def test_a_remembered_key_outlives_the_tab_and_the_browser_until_unticked(keyed_api, browser, tmp_path):
    context = browser.new_context()
    page, _ = _open(context, keyed_api)
    _save_key(page, remember=True)
    assert page.evaluate(STORED) == [None, KEY]
    page.close()
    with context.expect_event("response", lambda r: "/sessions" in r.url) as answer:
        page, asked = _open(context, keyed_api)  # a new tab: no key asked, the gallery read with it
    assert not asked and answer.value.status == 200
    saved = tmp_path / "state.json"
    context.storage_state(path=str(saved))
    context.close()
    restarted = browser.new_context(storage_state=str(saved))  # the browser closed and opened again
    page, asked = _open(restarted, keyed_api)
    assert not asked
    page.click("#key-button")
    assert page.is_checked("#key-remember")  # the dialog says the device remembers it
    _save_key(page, remember=False)  # unticked: the device forgets it, this tab keeps it
    assert page.evaluate(STORED) == [KEY, None]
    assert _open(restarted, keyed_api)[1]
    restarted.close()
