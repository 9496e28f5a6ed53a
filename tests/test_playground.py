"""The playground page (GET /) in a real browser: headless Chromium (Debian's `chromium`, installed by
the Makefile's .browser target) driven by Playwright.  The page reads the models with the API key it
keeps in localStorage, streams a chat answer that equals the server's non-streamed greedy answer,
carries the conversation into the next turn, stops an answer mid-stream (the server frees the
request), shows the API's errors, shows live engine metrics, and its image tab either says that
the server serves no images or shows the PNG."""

from __future__ import annotations

import os
import re
import shutil
import warnings

import httpx
import pytest
from loopback_server import Server

CHROMIUM = "/usr/bin/chromium"
KEY = "playground-key"


def _browser_or_skip():
    """Playwright's sync API, or a skip (a failure under CI, where `make test` installs both)."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package")
    if not shutil.which(CHROMIUM):
        missing.append(CHROMIUM)
    if missing:
        why = f"no {' and no '.join(missing)}: `make test` installs them (the .venv/.browser target)"
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why)
    return sync_playwright


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """What `onnxgen serve --api-key KEY` runs: the embedded default model (built in a fresh cache)."""
    from onnxgen.serve.server import build_app

    previous = os.environ.get("ONNXGEN_CACHE")
    os.environ["ONNXGEN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "serving no images" where there is no image pipeline
            app = build_app(api_key=KEY, engine_options={"kv_cache_gib": 0.1})
    finally:
        if previous is None:
            os.environ.pop("ONNXGEN_CACHE", None)
        else:
            os.environ["ONNXGEN_CACHE"] = previous
    server = Server(app)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(server):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.set_default_timeout(20_000)
        page.uncaught = []
        page.on("pageerror", lambda error: page.uncaught.append(str(error)))
        yield page
        browser.close()


def post(server, path, body):
    return httpx.post(f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def answers(page):
    return page.locator("#messages .message.assistant")


def send(page, text):
    page.fill("#chat-input", text)
    page.press("#chat-input", "Enter")


def test_playground_in_chromium(server, page):
    from playwright.sync_api import expect

    # No key yet: the model list is refused, and the page says so.
    page.goto(server.url)
    expect(page.locator("#error")).to_contain_text("401")
    expect(page.locator("#error")).to_contain_text("API key")
    # The key is used at once and kept across a reload.
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.reload()
    expect(page.locator("#api-key")).to_have_value(KEY)
    expect(page.locator("#model option")).not_to_have_count(0)
    expect(page.locator("#error")).to_be_hidden()
    model = page.input_value("#model")
    assert model == httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()[
        "data"][0]["id"]

    # A streamed greedy answer equals the non-streamed one for the same settings.
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    with page.expect_response("**/v1/chat/completions") as streamed:
        send(page, "Hello there, who are you?")
    sent = streamed.value.request.post_data_json
    assert sent["stream"] is True and streamed.value.headers["content-type"].startswith("text/event-stream")
    assert {k: sent[k] for k in ("temperature", "max_tokens", "top_p", "top_k")} == {
        "temperature": 0, "max_tokens": 24, "top_p": 1, "top_k": 0}
    first = answers(page).nth(0)
    expect(first).to_have_attribute("data-state", "done")
    body = {"model": model, "max_tokens": 24, "temperature": 0, "top_p": 1, "top_k": 0,
            "messages": [{"role": "user", "content": "Hello there, who are you?"}]}
    greedy = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert first.locator(".content").text_content() == greedy and greedy
    expect(first.locator(".meta")).to_contain_text("tokens")

    # The next turn carries the conversation.
    send(page, "Tell me more.")
    expect(answers(page).nth(1)).to_have_attribute("data-state", "done")
    body["messages"] += [{"role": "assistant", "content": greedy}, {"role": "user", "content": "Tell me more."}]
    greedy = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert answers(page).nth(1).locator(".content").text_content() == greedy

    # Stop aborts the fetch mid-stream; the server drops the request.
    page.fill("#max-tokens", "3000")
    send(page, "Write a very long story.")
    third = answers(page).nth(2)
    expect(third.locator(".content")).not_to_be_empty()
    page.click("#stop")
    expect(third).to_have_attribute("data-state", "stopped")
    expect(page.locator("#send")).to_be_enabled()

    # The metrics panel shows the engine's numbers, live: nothing running once the stopped request is gone.
    expect(page.locator("#metric-running")).to_have_text("0")
    expect(page.locator("#metric-waiting")).to_have_text("0")
    expect(page.locator("#metric-kv-total")).to_have_text(re.compile(r"^[1-9]\d*$"))
    expect(page.locator("#metric-kv-used")).to_have_text(re.compile(r"^\d+$"))
    expect(page.locator("#metric-tps")).to_have_text(re.compile(r"^\d+\.\d$"))
    expect(page.locator("#metric-tokens")).to_have_text(re.compile(r"^[1-9]\d*$"))
    expect(page.locator("#metrics-status")).to_contain_text("live")

    # An API error (OpenAI's body) is shown; the turn is undone and the text given back.
    page.fill("#max-tokens", "8")
    page.fill("#top-p", "0")
    send(page, "This one fails.")
    expect(page.locator("#error")).to_contain_text("400: top_p must be in")
    expect(page.locator("#chat-input")).to_have_value("This one fails.")
    expect(answers(page)).to_have_count(3)
    expect(page.locator("#messages .message.user")).to_have_count(3)
    page.fill("#top-p", "1")

    # The image tab: a clear message when the server has no image model, else the PNG.
    page.click("#tab-image")
    expect(page.locator("#panel-image")).to_be_visible()
    expect(page.locator("#panel-chat")).to_be_hidden()
    served = post(server, "/v1/images/generations", {"prompt": ""}).status_code != 404
    if not served:
        expect(page.locator("#image-status")).to_contain_text("serves no images")
        expect(page.locator("#image-generate")).to_be_disabled()
    else:
        page.fill("#image-prompt", "a red square")
        page.select_option("#image-size", "64x64")
        page.fill("#image-steps", "2")
        page.fill("#image-seed", "1")
        page.click("#image-generate")
        image = page.locator("#image-results img")
        expect(image).to_have_count(1, timeout=60_000)
        assert image.evaluate("img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])") == [64, 64]

    assert page.uncaught == []
