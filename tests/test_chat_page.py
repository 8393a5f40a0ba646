"""The chat page in headless Chromium (Debian's chromium + chromium-driver, which .ci/run installs),
against a real gunicorn server with an API key. The screenshot is kept as an artifact:
artifacts/chat_page.png, or under $NANOGPT_ARTIFACTS."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from browser import chromium, need_chromium, until
from conftest import REPO_ROOT
from model.gpt import GPTConfig
from serving import gunicorn_server, write_model

need_chromium(module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

KEY = "sk-page"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_model(models, "tiny", GPTConfig(block_size=1024, n_layer=2, n_head=2, n_embd=64))
    with gunicorn_server(models, tmp_path_factory.mktemp("logs") / "gunicorn.log", {"NANOGPT_API_KEYS": KEY}) as s:
        yield s


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path / "profile") as driver:
        yield driver


def assistant_texts(driver) -> list[str]:
    # textContent, not Selenium's .text: .text is the rendered text, which drops characters such as
    # U+200B that a random-weight model can sample, and the page sends the raw textContent back
    return [e.get_property("textContent") for e in driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")]


def send(driver, text: str, max_tokens: int, enter: bool = False) -> None:
    field = driver.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(str(max_tokens))
    driver.find_element(By.ID, "prompt").send_keys(text)
    if enter:
        driver.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "send").click()


# Keeps a copy of every JSON body the page sends, to check what a turn carried.
RECORD_BODIES = """
const original = window.fetch;
window.sentBodies = [];
window.fetch = (url, options) => {
  if (options && options.body) window.sentBodies.push(JSON.parse(options.body));
  return original(url, options);
};
"""


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_chat_page(server, browser):
    browser.get(server.url + "/")
    # no key yet: the first model list is refused, and the page says why
    until(browser, lambda d: "Missing API key" in d.find_element(By.ID, "error").text, "missing key message")
    assert [e for e in console_errors(browser) if "401" not in e] == []
    # Send before any model could be listed: the reason stays on screen, and the picker keeps its width
    browser.find_element(By.ID, "prompt").send_keys("Hello?")
    browser.find_element(By.ID, "send").click()
    assert "Missing API key" in browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "model").size["width"] > 100
    browser.find_element(By.ID, "prompt").clear()
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(KEY)
    browser.find_element(By.ID, "refresh").click()
    until(browser, lambda d: [o.text for o in Select(d.find_element(By.ID, "model")).options] == ["tiny"], "model list")
    assert not browser.find_element(By.ID, "error").is_displayed()
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny")
    browser.execute_script(RECORD_BODIES)

    # a long answer streams in, and Stop ends it mid-stream, on the page and on the server
    send(browser, "Tell me a long story.", 1000)
    until(browser, lambda d: len(assistant_texts(d)) == 1 and len(assistant_texts(d)[0]) > 20, "streamed text")
    assert browser.find_element(By.ID, "stop").is_enabled()  # still streaming on the page...
    assert server.figures("tiny")["running"] == 1  # ...and on the server: 1000 tokens take seconds
    browser.find_element(By.ID, "stop").click()
    until(browser, lambda d: "stopped" in d.find_element(By.CSS_SELECTOR, ".message.assistant").get_attribute("class"), "stopped")
    stopped_text = assistant_texts(browser)[0]
    deadline = time.monotonic() + 10
    while (f := server.figures("tiny"))["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f["running"] == 0 and f["finished"] == {"stop": 0, "length": 0, "cancelled": 1, "error": 0}  # the abort freed the row
    time.sleep(0.5)  # the one fixed wait: long enough for more text to show up if the stream went on
    assert assistant_texts(browser)[0] == stopped_text  # nothing more arrived
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()

    # a second turn (sent with Enter) completes, and its request carried the whole conversation,
    # the stopped answer included
    send(browser, "And a short one?", 8, enter=True)
    until(browser, lambda d: d.find_element(By.ID, "send").is_enabled() and len(assistant_texts(d)) == 2, "second answer")
    assert assistant_texts(browser)[1] and (f := server.figures("tiny")["finished"])["length"] + f["stop"] == 1
    messages = browser.find_elements(By.CSS_SELECTOR, "#messages .message")
    assert [m.get_attribute("class").split()[1] for m in messages] == ["user", "assistant", "user", "assistant"]
    bodies = browser.execute_script("return window.sentBodies")
    assert [b["max_tokens"] for b in bodies] == [1000, 8] and bodies[1]["model"] == "tiny" and bodies[1]["stream"]
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "Tell me a long story."},
        {"role": "assistant", "content": stopped_text},
        {"role": "user", "content": "And a short one?"},
    ]
    assert console_errors(browser) == []  # since the key: no failed requests (favicon included), no script errors

    artifacts = Path(os.environ.get("NANOGPT_ARTIFACTS", REPO_ROOT / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / "chat_page.png"))
    print(f"screenshot: {artifacts / 'chat_page.png'}")

    # a wrong key: the 401's message is shown
    key.clear()
    key.send_keys("sk-wrong")
    browser.find_element(By.ID, "refresh").click()
    until(browser, lambda d: d.find_element(By.ID, "error").is_displayed(), "error shown")
    assert "401" in browser.find_element(By.ID, "error").text and "API key" in browser.find_element(By.ID, "error").text
    send(browser, "Hello?", 8)
    until(browser, lambda d: d.find_element(By.ID, "send").is_enabled(), "send re-enabled")
    assert "Incorrect API key" in browser.find_element(By.ID, "error").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#messages .message")) == 4  # the failed turn is not kept...
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Hello?"  # ...but can be sent again


def test_server_down_is_reported(server, browser):
    """Last in this module: it stops the server."""
    browser.get(server.url + "/")
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.ID, "refresh").click()
    until(browser, lambda d: len(Select(d.find_element(By.ID, "model")).options) == 1, "model list")
    server.proc.terminate()
    server.proc.wait(timeout=30)
    send(browser, "Anyone there?", 8)
    until(browser, lambda d: "unreachable" in d.find_element(By.ID, "error").text, "server down message")

