"""/docs and /redoc work without internet: every asset they load comes from the app itself."""

from __future__ import annotations

import re
import shutil
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.support.service import APIProcess, service_settings, settings_env

# src="...", href="...", and the urls Swagger UI's and ReDoc's inline scripts are given.
ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|(?:url|spec-url)\s*:\s*['"]([^'"]+)['"]""")


@pytest.fixture(scope="module")
def client(private_redis, tmp_path_factory):
    with TestClient(create_app(service_settings(private_redis.url, tmp_path_factory.mktemp("data")))) as c:
        yield c


def asset_urls(html: str) -> list[str]:
    return [a or b for a, b in ASSET.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_only_assets_the_app_serves(client, page):
    response = client.get(page)
    assert response.status_code == 200
    urls = asset_urls(response.text)
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts, f"{page} loads no script: {urls}"
    off_origin = [u for u in urls if urlsplit(u).scheme or urlsplit(u).netloc or u.startswith("//")]
    assert off_origin == [], f"{page} loads from other origins: {off_origin}"
    assert "/openapi.json" in urls or page == "/redoc" and "/openapi.json" in response.text
    for url in urls:
        served = client.get(url)
        assert served.status_code == 200, url
        assert len(served.content) > 0, url


@pytest.mark.slow
def test_swagger_ui_renders_the_operations_with_every_other_origin_blocked(private_redis, tmp_path):
    """In a real browser with the internet cut off (any request to another origin aborted),
    Swagger UI draws the operations of FastAPI's OpenAPI 3.1 document."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/test installs Debian's package)")
    from playwright.sync_api import sync_playwright

    api = APIProcess(settings_env(service_settings(private_redis.url, tmp_path / "data")), tmp_path / "api.log")
    blocked: list[str] = []
    try:
        api.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()

            def only_the_app(route):
                if route.request.url.startswith(api.base_url):
                    return route.continue_()
                blocked.append(route.request.url)
                return route.abort()

            page.route("**/*", only_the_app)
            page.goto(f"{api.base_url}/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            operations = page.locator(".opblock-summary-path").all_inner_texts()
            browser.close()
    finally:
        api.stop()
    assert "/generate" in operations and "/jobs/{job_id}" in operations
    assert blocked == []
