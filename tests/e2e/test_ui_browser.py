"""The results page in a real browser: headless Chromium (Selenium, chromedriver)
against a real stack: a redis-server, real text and image worker processes, a SQLite
store, and `mmq api` under uvicorn on a free port. One stack and one browser for the
module.

Screenshots are kept in ``$MMQ_ARTIFACTS/ui`` (default ``var/artifacts/ui``): signin,
signin-refused, submit, jobs, job, dropped, no-javascript, search, corrected.
``docs/ui.png`` in the README is ``jobs.png`` from a run of this module.

``test_search_a_cat_finds_the_photograph`` needs search (``Client.search``,
``POST /v1/search``); every other test here runs on the page alone.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from producer.ops.stack import EXAMPLES
from tests.e2e.browser import chrome, screenshot
from tests.helpers import Worker, free_port, service_env, wait_http

KEYS = {"alice": "alice-browser-key-1", "bob": "bob-browser-key-2"}
LABELS = "a cat, a dog, a car, a cup of coffee"
TEXT = "The cat slept all afternoon on the warm windowsill."
WAIT_S = 300  # generous: two workers, the API and Chromium share a small machine


def _photo(name: str, path: Path) -> Path:
    """A real photograph from scikit-image's data (public domain / CC0) as a JPEG:
    chelsea is a tabby cat, coffee a cup of coffee."""
    from skimage import data

    Image.fromarray(getattr(data, name)()).save(path, "JPEG", quality=90)
    return path


@pytest.fixture(scope="module")
def stack_env(new_broker, tmp_path_factory) -> tuple[Path, dict]:
    """-> (folder for files, the stack's environment: what `mmq` commands run with)."""
    tmp = tmp_path_factory.mktemp("ui-browser")
    return tmp, service_env(new_broker(), f"sqlite:///{tmp / 'mmq.db'}",
                            MMQ_API_KEYS=",".join(f"{k}:{v}" for k, v in KEYS.items()),
                            MMQ_UI_REFRESH_S=1, MMQ_ADAPTERS_DIR=tmp / "adapters")


@pytest.fixture(scope="module")
def stack(stack_env):
    """-> (base URL, folder for files). Text and image workers (a text query is
    embedded on the text queue), the API with two keys."""
    tmp, env = stack_env
    subprocess.run([sys.executable, "-m", "producer.cli", "db", "upgrade"], env=env, check=True)
    workers = [Worker(m, env, tmp / f"{m}.log", concurrency=2) for m in ("text", "image")]
    port = free_port()
    log = tmp / "api.log"
    api = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
                           env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for w in workers:
            w.wait_ready()
        wait_http(f"{base}/healthz", api, log, timeout=120)
        yield base, tmp
    finally:
        api.terminate()
        api.wait(20)
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def browser():
    driver = chrome()
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, stack):
    """The browser, signed out (no cookies left from another test)."""
    base, _ = stack
    browser.get(f"{base}/ui/signin")
    browser.delete_all_cookies()
    return browser


def _until(driver, condition, timeout: float = WAIT_S, what: str = ""):
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def safe(d):
        try:  # ui.js replaces the rows while we look at them
            return condition(d)
        except (StaleElementReferenceException, WebDriverException):
            return False

    return WebDriverWait(driver, timeout, poll_frequency=0.3).until(safe, what)


def sign_in(driver, base: str, who: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/ui/jobs")
    assert "/ui/signin" in driver.current_url  # the page asks first
    driver.find_element(By.ID, "key").send_keys(KEYS[who])
    driver.find_element(By.ID, "signin").click()
    _until(driver, lambda d: d.current_url.endswith("/ui/jobs"), 60, "signed in")
    assert who in driver.find_element(By.ID, "who").text


def test_a_wrong_key_is_refused(page, stack):
    from selenium.webdriver.common.by import By

    base, _ = stack
    page.get(f"{base}/ui/jobs")
    assert page.current_url.startswith(f"{base}/ui/signin")
    screenshot(page, "ui", "signin")
    page.find_element(By.ID, "key").send_keys("not-a-key")
    page.find_element(By.ID, "signin").click()
    error = _until(page, lambda d: d.find_element(By.ID, "error"), 60, "refusal")
    assert "not accepted" in error.text
    assert page.get_cookies() == []
    screenshot(page, "ui", "signin-refused")
    page.get(f"{base}/ui/jobs")
    assert "/ui/signin" in page.current_url


def test_sign_in_submit_a_photo_see_its_result_and_sign_out(page, stack):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, tmp = stack
    sign_in(page, base, "alice")
    cookie = next(c for c in page.get_cookies() if c["name"] == "mmq_ui")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Lax"
    assert KEYS["alice"] not in cookie["value"]

    page.find_element(By.LINK_TEXT, "Submit").click()
    photo = _photo("chelsea", tmp / "chelsea.jpg")
    page.find_element(By.ID, "files").send_keys(str(photo))  # the plain file input
    assert not page.find_elements(By.ID, "no-drop")  # scripts on: <noscript> is inert
    page.find_element(By.ID, "text").send_keys(TEXT)  # a text job beside the photograph
    Select(page.find_element(By.ID, "task")).select_by_value("classify")
    page.find_element(By.ID, "labels").send_keys(LABELS)
    _until(page, lambda d: "chelsea.jpg" in d.find_element(By.ID, "dropped").text, 30,
           "file listed")
    screenshot(page, "ui", "submit")
    page.find_element(By.ID, "submit").click()

    notice = _until(page, lambda d: d.find_element(By.ID, "notice"), 60, "submitted")
    assert notice.text == "Submitted 2 jobs."
    kinds = _until(page, lambda d: {  # newest first: these two (read again if ui.js
        # swaps a row in meanwhile: their statuses stream in at once)
        r.get_attribute("data-modality"): r.get_attribute("id").removeprefix("job-")
        for r in d.find_elements(By.CSS_SELECTOR, "tr.job")[:2]}, 30, "the new rows")
    assert set(kinds) == {"image", "text"}
    job = kinds["image"]
    # No reload from here on: ui.js follows the rows' events until the results are in.
    url = page.current_url
    for j in kinds.values():  # (ui.js replaces a row when its status changes)
        _until(page, lambda d, j=j: d.find_element(By.ID, f"job-{j}").get_attribute(
            "data-status") == "succeeded", what=f"job {j} succeeded")
    assert page.current_url == url
    text_row = page.find_element(By.ID, f"job-{kinds['text']}")
    assert TEXT in text_row.text and text_row.find_elements(By.CSS_SELECTOR, "ol.labels li")
    # The statuses came as Server-Sent Events (no polling), and the stream ended once
    # both jobs had finished; a finished row is left alone (an <audio> being played in it
    # keeps playing).
    tbody = page.find_element(By.ID, "jobs-rows")
    _until(page, lambda d: tbody.get_attribute("data-live") == "done", 60, "stream ended")
    assert int(tbody.get_attribute("data-events-seen")) >= 2
    assert text_row.get_attribute("data-status") == "succeeded"  # the same element: not stale
    row = page.find_element(By.ID, f"job-{job}")
    assert row.find_element(By.CSS_SELECTOR, ".status").text == "succeeded"
    labels = [e.text for e in row.find_elements(By.CSS_SELECTOR, "ol.labels .label")]
    assert labels and labels[0] == "a cat", labels
    thumb = row.find_element(By.CSS_SELECTOR, "img.thumb")
    _until(page, lambda d: d.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", thumb) > 0, 60,
        "thumbnail loaded")
    screenshot(page, "ui", "jobs")

    row.find_element(By.CSS_SELECTOR, "a.job-link").click()
    _until(page, lambda d: d.find_element(By.ID, "job").get_attribute("data-status")
           == "succeeded", 60, "job page")
    assert job in page.find_element(By.CSS_SELECTOR, ".facts").text
    screenshot(page, "ui", "job")

    page.find_element(By.ID, "signout").click()
    _until(page, lambda d: d.current_url.endswith("/ui/signin"), 60, "signed out")
    assert not [c for c in page.get_cookies() if c["name"] == "mmq_ui"]
    page.get(f"{base}/ui/jobs/{job}")
    assert "/ui/signin" in page.current_url


def test_a_dropped_file_is_submitted(page, stack):
    """Drag-and-drop: a drop event carrying a file, as a desktop drag delivers it."""
    from selenium.webdriver.common.by import By

    base, _ = stack
    sign_in(page, base, "bob")
    page.get(f"{base}/ui/submit")
    png = base64.b64encode((EXAMPLES / "digit-seven.png").read_bytes()).decode()
    page.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "digit-seven.png", {type: "image/png"}));
        const zone = document.getElementById("dropzone");
        const how = {dataTransfer: dt, bubbles: true, cancelable: true};
        zone.dispatchEvent(new DragEvent("dragover", how));
        zone.dispatchEvent(new DragEvent("drop", how));
    """, png)
    assert "digit-seven.png" in page.find_element(By.ID, "dropped").text
    assert page.execute_script("return document.getElementById('files').files.length") == 1
    screenshot(page, "ui", "dropped")
    page.find_element(By.ID, "submit").click()
    notice = _until(page, lambda d: d.find_element(By.ID, "notice"), 60, "submitted")
    assert notice.text == "Submitted 1 job."
    # Read again if ui.js swaps the row in meanwhile (its status streams in at once: the
    # element found first went stale once the image ran fast enough, in CI's run).
    modality = _until(page, lambda d: d.find_element(By.CSS_SELECTOR, "tr.job").get_attribute(
        "data-modality"), 30, "the new row")
    assert modality == "image"
    _until(page, lambda d: d.find_element(By.CSS_SELECTOR, "tr.job").get_attribute(
        "data-status") == "succeeded", what="the dropped image ran")


def test_the_page_works_without_javascript(stack):
    """Scripts off: sign in, submit a text through the form, and the job's result
    arrives by the page's own meta refresh."""
    from selenium.webdriver.common.by import By

    base, _ = stack
    driver = chrome(javascript=False)
    try:
        sign_in(driver, base, "bob")
        driver.get(f"{base}/ui/submit")
        # <noscript> content is parsed as elements only when scripts are really off.
        assert driver.find_element(By.ID, "no-drop").is_displayed()
        driver.find_element(By.ID, "text").send_keys("Rates rose again at the central bank.")
        driver.find_element(By.ID, "submit").click()
        notice = _until(driver, lambda d: d.find_element(By.ID, "notice"), 60, "submitted")
        assert notice.text == "Submitted 1 job."
        job = driver.find_element(By.CSS_SELECTOR, "tr.job").get_attribute("id")
        _until(driver, lambda d: d.find_element(By.ID, job).get_attribute("data-status")
               == "succeeded", what="succeeded, seen through meta refresh")
        assert "embedding, 384 dimensions" in driver.find_element(By.ID, job).text
        screenshot(driver, "ui", "no-javascript")
    finally:
        driver.quit()


def _submit_over_http(base: str, who: str, path: Path) -> str:
    r = httpx.post(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {KEYS[who]}"},
                   files={"file": (path.name, path.read_bytes())}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait_succeeded(base: str, who: str, job: str) -> None:
    r = httpx.get(f"{base}/v1/jobs/{job}/wait", params={"timeout": 60, "embedding": False},
                  headers={"Authorization": f"Bearer {KEYS[who]}"}, timeout=90)
    end = time.monotonic() + WAIT_S
    while r.json()["status"] in ("queued", "running") and time.monotonic() < end:
        r = httpx.get(f"{base}/v1/jobs/{job}/wait", params={"timeout": 60, "embedding": False},
                      headers={"Authorization": f"Bearer {KEYS[who]}"}, timeout=90)
    assert r.json()["status"] == "succeeded", r.json()


def test_another_key_sees_none_of_alices_jobs(page, stack):
    from selenium.webdriver.common.by import By

    base, tmp = stack
    job = _submit_over_http(base, "alice", _photo("coffee", tmp / "coffee.jpg"))
    sign_in(page, base, "bob")
    assert not page.find_elements(By.ID, f"job-{job}")
    page.get(f"{base}/ui/jobs/{job}")
    assert "No job" in page.find_element(By.ID, "error").text
    page.get(f"{base}/ui/jobs/{job}/input")
    assert "no such input" in page.page_source


def test_search_a_cat_finds_the_photograph(page, stack):
    """Needs search (Client.search / POST /v1/search): fails with the page's 501
    message until that is merged."""
    from selenium.webdriver.common.by import By

    base, tmp = stack
    cat = _submit_over_http(base, "alice", _photo("chelsea", tmp / "cat-query.jpg"))
    coffee = _submit_over_http(base, "alice", _photo("coffee", tmp / "coffee-2.jpg"))
    for job in (cat, coffee):
        _wait_succeeded(base, "alice", job)
    sign_in(page, base, "alice")
    box = page.find_element(By.NAME, "q")
    box.send_keys("a cat")
    box.submit()
    found = _until(page, lambda d: d.find_elements(By.ID, "results")
                   or d.find_elements(By.ID, "error"), 120, "results")[0]
    assert found.get_attribute("id") == "results", found.text  # e.g. 501: no search yet
    results = found
    hits = results.find_elements(By.CSS_SELECTOR, "article.hit")
    assert hits, results.text
    # The best image hit is a cat: this photograph, or the same photograph submitted
    # through the page by another test (same bytes, same embedding).
    images = [h for h in hits if h.get_attribute("data-modality") == "image"]
    assert images and cat in [h.get_attribute("id").removeprefix("hit-") for h in images]
    best = images[0]
    assert "a cat" in best.text or best.get_attribute("id") == f"hit-{cat}"
    assert coffee not in images[0].get_attribute("id")
    screenshot(page, "ui", "search")


def _mmq(env: dict, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env,
                       capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 0, f"mmq {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _classify(base: str, texts: list[str], labels: list[str]) -> list[dict]:
    """Text classify jobs by alice over HTTP, run by the workers -> their results."""
    auth = {"Authorization": f"Bearer {KEYS['alice']}"}
    r = httpx.post(f"{base}/v1/jobs:batch", headers=auth, timeout=60, json={"items": [
        {"modality": "text", "text": t, "task": "classify", "labels": labels} for t in texts]})
    assert r.status_code == 202, r.text
    ids = [j["id"] for j in r.json()["jobs"]]
    for job in ids:
        _wait_succeeded(base, "alice", job)
    return [httpx.get(f"{base}/v1/jobs/{j}", params={"embedding": False}, headers=auth,
                      timeout=30).json() for j in ids]


def test_corrections_on_the_page_train_a_version_that_labels_new_jobs(page, stack,
                                                                       stack_env):
    """The loop: alice corrects three jobs on the page (five more through the API),
    `mmq train text --from-corrections`, `mmq models promote`, and a new job of the same
    kind, naming no version, gets the label she taught. Last in the module: it
    promotes a text version (rolled back at the end)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.helpers import FINANCE, SPORT

    base, _ = stack
    _, env = stack_env
    labels, probe = ["alpha", "omega"], "the goalkeeper saved a penalty in extra time"
    # Names that mean nothing to the text tower: what the base says of a sport sentence
    # is what alice calls finance, so only her corrections can make the probe right.
    before = _classify(base, [probe], labels)[0]
    said = before["prediction"]["labels"][0][0]
    sport, finance = [lb for lb in labels if lb != said][0], said
    jobs = _classify(base, SPORT[:4] + FINANCE[:4], labels)
    right = {j["id"]: sport if i < 4 else finance for i, j in enumerate(jobs)}
    on_page = [jobs[0]["id"], jobs[4]["id"], jobs[1]["id"]]

    sign_in(page, base, "alice")
    for n, job in enumerate(on_page):
        page.get(f"{base}/ui/jobs/{job}")
        if n < 2:
            Select(page.find_element(By.ID, "correct-choice")).select_by_value(right[job])
        else:  # the "new label" box wins over the list
            page.find_element(By.ID, "correct-new").send_keys(right[job])
        page.find_element(By.ID, "correct").click()
        notice = _until(page, lambda d: d.find_element(By.ID, "notice"), 60, "corrected")
        assert notice.text == f"Corrected: the right label is '{right[job]}'."
        assert "marked by alice via ui" in page.find_element(By.ID, "correction").text
    screenshot(page, "ui", "corrected")
    page.get(f"{base}/ui/jobs")
    row = _until(page, lambda d: d.find_element(By.ID, f"job-{on_page[0]}"), 60, "listed")
    assert f"corrected {right[on_page[0]]}" in row.text.lower()  # the tag is in capitals
    auth = {"Authorization": f"Bearer {KEYS['alice']}"}
    for job, label in right.items():
        if job not in on_page:
            r = httpx.put(f"{base}/v1/jobs/{job}/correction", json={"label": label},
                          headers=auth, timeout=30)
            assert r.status_code == 200, r.text

    out = _mmq(env, "train", "text", "--from-corrections", "--owner", "alice",
               "--name", "alice-corrected", "-q")
    assert "trained from 8 corrected job(s)" in out, out
    shown = json.loads(_mmq(env, "models", "show", "alice-corrected"))
    assert shown["corrections"] == 8 and shown["config"]["corrections"] == {
        "count": 8, "owner": "alice", "labels": {sport: 4, finance: 4}}
    assert shown["metrics"]["labels"] == sorted(labels)
    _mmq(env, "models", "promote", "alice-corrected")
    try:
        after = _classify(base, [probe], labels)[0]
        assert after["model_version"].startswith("alice-corrected@"), after
        assert after["prediction"]["labels"][0][0] == sport != said, (before, after)
    finally:
        _mmq(env, "models", "rollback", "text")
