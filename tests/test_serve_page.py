"""The chat page `serve` ships at `/`, in a real headless browser (Debian's chromium, driven by
selenium through chromedriver) against a live server on a loopback port.

What the page shows is compared with the API's own greedy answer to the same request; stopping
an answer is checked on the server's side too (its slot comes back, a next request is served).
Outside CI a machine without chromium skips with the reason; in CI (env CI set) it fails.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from browser import WAIT
from helpers import make_adapter
from serving import LiveServer, http
from serving import loopback_only as no_network  # noqa: F401 - replaces conftest's fixture

from mlxlocal.generate import load_model
from mlxlocal.serve import create_app

LAST_ANSWER = """
const all = document.querySelectorAll('#messages .msg.assistant');
const el = all[all.length - 1];
return el ? {state: el.dataset.state || null, finish: el.dataset.finish || null,
             text: el.querySelector('.content').textContent} : null;
"""
# Counts every change to an answer's text, so a test can tell streaming from one late update.
COUNT_UPDATES = """
window.updates = 0;
new MutationObserver((records) => {
  for (const r of records) if (r.target.classList && r.target.classList.contains('content')) {
    window.updates += 1;
  }
}).observe(document.getElementById('messages'), {childList: true, subtree: true});
"""


@pytest.fixture(scope="module")
def lm(mlx_checkpoints):
    """A tiny model with a long context, so an answer can run long enough to be stopped."""
    return load_model(mlx_checkpoints("llama", max_position_embeddings=8192))


@pytest.fixture(scope="module")
def live(lm, tmp_path_factory):
    """One slot and no queue: while a stopped answer still held its slot, a request would 429."""
    adapter = make_adapter(lm.path, tmp_path_factory.mktemp("page") / "lora")
    app = create_app(lm, {"lora": adapter}, max_concurrency=1, queue=0)
    with LiveServer(app) as server:
        yield server


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition, f"waiting for {what}")


def open_page(driver, url: str) -> list[str]:
    """Load the page; the model ids its selector offers."""
    driver.get(f"{url}/")
    ids = "return [...document.querySelectorAll('#model option')].map(o => o.value)"
    wait(driver, lambda d: d.execute_script(ids), "the model list")
    driver.execute_script(COUNT_UPDATES)
    return driver.execute_script(ids)


def fill(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value, Keys.TAB)  # leaving the field fires its change event


def settle(driver) -> dict:
    """The last answer, once it has ended (done, stopped or failed)."""
    wait(driver, lambda d: (d.execute_script(LAST_ANSWER) or {}).get("state") != "streaming",
         "the answer to end")  # fmt: skip
    return driver.execute_script(LAST_ANSWER)


def send(driver, text: str) -> dict:
    from selenium.webdriver.common.by import By

    wait(driver, lambda d: d.find_element(By.ID, "send").is_enabled(), "the send button")
    driver.execute_script("window.updates = 0")
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: d.execute_script(LAST_ANSWER), "an answer to start")
    return settle(driver)


def api_answer(url: str, messages: list[dict], model: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    status, reply = http("POST", f"{url}/v1/chat/completions", json.dumps(body).encode(),
                         {"Content-Type": "application/json"})  # fmt: skip
    assert status == 200, reply
    return reply["choices"][0]


def test_page_streams_the_apis_greedy_answer_in_a_conversation(browser, live, lm):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base = lm.path.name
    assert open_page(browser, live.url) == [base, "lora"]
    assert browser.execute_script("return getComputedStyle(document.body).display") == "flex"
    system = "You answer in one line."
    fill(browser, "system", system)
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "24")

    first = send(browser, "the quick brown fox")
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "the quick brown fox"}]  # fmt: skip
    expected = api_answer(live.url, messages, base, 24)
    assert first["state"] == "done" and first["finish"] == expected["finish_reason"]
    assert first["text"] == expected["message"]["content"] != ""
    assert browser.execute_script("return window.updates") > 1  # it grew as tokens came

    # The second turn carries the first: the page resends the whole conversation.
    second = send(browser, "and the lazy dog")
    messages += [{"role": "assistant", "content": first["text"]},
                 {"role": "user", "content": "and the lazy dog"}]  # fmt: skip
    assert second["text"] == api_answer(live.url, messages, base, 24)["message"]["content"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 4

    # An adapter picked in the selector, in a new chat: the adapter's answer, no history.
    Select(browser.find_element(By.ID, "model")).select_by_value("lora")
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    adapted = send(browser, "a lazy dog")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "a lazy dog"}]
    assert adapted["text"] == api_answer(live.url, messages, "lora", 24)["message"]["content"]
    assert browser.find_element(By.ID, "error").is_displayed() is False


def test_stop_ends_the_answer_and_frees_the_servers_slot(browser, live, lm, caplog):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    caplog.set_level("INFO", logger="mlxlocal.serve")
    base = lm.path.name
    open_page(browser, live.url)
    Select(browser.find_element(By.ID, "model")).select_by_value(base)  # the page remembers lora
    fill(browser, "system", "")
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "8000")
    browser.find_element(By.ID, "prompt").send_keys("the fox")
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: len((d.execute_script(LAST_ANSWER) or {}).get("text", "")) > 0,
         "the answer's first tokens")  # fmt: skip
    assert browser.find_element(By.ID, "stop").is_enabled()
    browser.find_element(By.ID, "stop").click()

    stopped = settle(browser)
    assert stopped["state"] == "stopped" and stopped["text"]

    def posts() -> list[str]:
        lines = (r.getMessage() for r in caplog.records if r.name == "mlxlocal.serve")
        return [line for line in lines if "POST /v1/chat/completions" in line]

    deadline = time.monotonic() + WAIT  # the server sees the closed stream and drops it
    while http("GET", f"{live.url}/health")[1]["load"] or not posts():
        assert time.monotonic() < deadline, "the stopped answer still holds the server's slot"
        time.sleep(0.05)
    assert browser.execute_script(LAST_ANSWER) == stopped  # nothing more arrived
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()
    generated = int(re.search(r"completion_tokens=(\d+)", posts()[0]).group(1))
    assert 0 < generated < 8000  # it was cut short

    # The one slot is free (no queue: a busy server would answer 429), and the next turn of the
    # same conversation is answered as the API answers it.
    fill(browser, "max-tokens", "8")
    after = send(browser, "a lazy dog")
    messages = [{"role": "user", "content": "the fox"},
                {"role": "assistant", "content": stopped["text"]},
                {"role": "user", "content": "a lazy dog"}]  # fmt: skip
    assert after["state"] == "done"
    assert after["text"] == api_answer(live.url, messages, base, 8)["message"]["content"]


def test_errors_show_the_servers_message_and_keep_the_text(browser, live):
    from selenium.webdriver.common.by import By

    open_page(browser, live.url)
    browser.find_element(By.ID, "new-chat").click()
    fill(browser, "max-tokens", "100000")  # beyond the 8192-token context: a 400
    browser.find_element(By.ID, "prompt").send_keys("too long")
    browser.find_element(By.ID, "send").click()
    error = browser.find_element(By.ID, "error")
    wait(browser, lambda d: error.is_displayed(), "the error")
    assert re.fullmatch(r"Error 400: max_tokens 100000 is beyond the context: .* at most \d+ can "
                        r"be generated", error.text), error.text  # fmt: skip
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .msg") == []  # taken back…
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "too long"  # …to edit


def test_api_key_is_asked_for_then_sent_as_bearer(browser, lm):
    from selenium.webdriver.common.by import By

    with LiveServer(create_app(lm, api_key="s3cret key")) as server:
        browser.get(f"{server.url}/")
        error = browser.find_element(By.ID, "error")
        wait(browser, lambda d: error.is_displayed(), "the error")
        assert error.text.startswith("Error 401: missing or wrong API key")
        assert "enter the server's API key in the settings" in error.text
        fill(browser, "api-key", "s3cret key")
        wait(browser, lambda d: not error.is_displayed(), "the models with the key")
        options = browser.find_elements(By.CSS_SELECTOR, "#model option")
        assert [o.get_attribute("value") for o in options] == [lm.path.name]
        fill(browser, "temperature", "0")
        fill(browser, "max-tokens", "6")
        answer = send(browser, "the fox")
        assert answer["state"] == "done" and answer["text"]
