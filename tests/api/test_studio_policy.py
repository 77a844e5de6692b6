"""The studio under its Content-Security-Policy, and its PNG drop under the bounds of ``lmd info``,
in a real browser (Debian's Chromium, Playwright) against a real ``lmd serve`` (no workers needed).
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
