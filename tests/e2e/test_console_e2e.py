"""The web console as a user drives it: Debian's Chromium, headless, against the chart's API
Deployment on the real node, with real backfills behind it (the operator and jobrunner images,
fakesnow, Kafka). Asserts on what the page shows, next to what Kafka and the resource hold.

Screenshots of the list and of the start form go to $BEAM_CONSOLE_SCREENSHOTS when it is set
(`hack/screenshots` sets it to docs/images, for the README)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from e2e_helpers import (
    DROP_WETH_AND_LABEL,
    WEEK,
    WETH,
    WINDOW,
    assert_exactly,
    backfill,
    expected_ids,
    make_key,
    read_topic,
    wait_status,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from beam_devstack import dataset
from beam_devstack.substrate.browser import console_errors, save_screenshot
from beam_devstack.substrate.kafka_proxy import END_TXN
from beam_devstack.substrate.proc import wait_for

HOSTILE = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>&amp; \"q\" 'a'"


def shots() -> Path | None:
    where = os.environ.get("BEAM_CONSOLE_SCREENSHOTS")
    return Path(where) if where else None


def full_page_shot(browser, path: Path) -> None:
    """The whole page, not only the window: the window grows to the page's height for the shot."""
    width, height = browser.get_window_size()["width"], browser.get_window_size()["height"]
    full = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, max(full + 140, height))  # + the browser's own frame
    try:
        save_screenshot(browser, path)
    finally:
        browser.set_window_size(width, height)


def sign_in(browser, base: str, key: str) -> None:
    browser.get(f"{base}/console/backfills")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "key"))  # redirected to sign in
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "jobs"))


def fill_start_form(browser, base: str, *, name: str, topic: str, window=WINDOW) -> None:
    browser.get(f"{base}/console/new")
    Select(browser.find_element(By.ID, "table")).select_by_value(dataset.TABLE)
    browser.find_element(By.ID, "job_name").send_keys(name)
    browser.find_element(By.ID, "filter_column").send_keys("token_address")
    browser.find_element(By.ID, "filter_values").send_keys(dataset.USDC)
    for field in ("start", "end"):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(window[field])
    Select(browser.find_element(By.ID, "dest-0-type")).select_by_value("kafka")
    browser.find_element(By.ID, "dest-0-name").send_keys(topic)


def submit(browser) -> str:
    browser.find_element(By.CSS_SELECTOR, "#new-backfill .submit button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.ID, "progress"))
    return browser.find_element(By.ID, "progress").get_attribute("data-job-id")


def row_text(browser, uid: str) -> list[str]:
    """The row's cells as shown, read in one step: the live list replaces its rows every 2 s."""
    return browser.execute_script(
        "const r = [...document.querySelectorAll('tr[data-job-id]')].find(t => t.dataset.jobId === arguments[0]);"
        "return r ? [...r.cells].map(c => c.innerText.trim()) : [];",
        uid,
    )


def test_start_the_seed_backfill_from_the_form_and_watch_it_complete(
    k8s, operator, kafka, seeded, org, api_base, browser
):
    key = make_key(k8s, org)
    ids = expected_ids(seeded)
    sign_in(browser, api_base, key)
    fill_start_form(browser, api_base, name="console seed", topic="console-seed")

    # The table's columns, with their types, read through a preview Job.
    browser.find_element(By.ID, "load-columns").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#column-picker label.col"))
    picked = browser.find_element(By.ID, "column-picker").text
    assert "unique_id" in picked and "block_timestamp" in picked and "TIMESTAMP" in picked, picked

    # The preview: the window's rows before anything runs, and the first rows as delivered.
    t0 = time.monotonic()
    browser.find_element(By.ID, "preview-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.ID, "p-rows"))
    preview_seconds = time.monotonic() - t0
    assert browser.find_element(By.ID, "p-rows").text == f"{len(ids):,}"
    samples = browser.find_elements(By.CSS_SELECTOR, "pre.sample")
    assert samples and dataset.USDC in samples[0].text
    print(f"console preview answered in {preview_seconds:.2f} s")  # docs/console.md quotes it
    if shots():
        full_page_shot(browser, shots() / "console-start.png")

    uid = submit(browser)
    browser.get(f"{api_base}/console/backfills")
    browser.execute_script("window.__same_page = true")  # gone if the page were reloaded
    live: list[str] = []

    def completed(d) -> bool:
        cells = row_text(d, uid) or ["", "", "", "", ""]
        if shots() and not live and cells[1].startswith("transporting") and cells[4] != "–":
            save_screenshot(d, shots() / "console-list.png")  # the list while rows move, if caught
            live.append(cells[4])
        return "completed" in cells[1]

    WebDriverWait(browser, 240, poll_frequency=0.5).until(completed)
    assert browser.execute_script("return window.__same_page === true"), "the list reloaded the page"
    cells = row_text(browser, uid)
    assert cells[0].startswith("console seed")
    delivered = read_topic(kafka.bootstrap, f"{org}.console-seed")
    assert len(delivered) == len(ids)
    assert cells[3] == f"{len(ids):,} / {len(ids):,}", cells  # rows delivered / staged
    chunks = k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills")["items"]
    [obj] = [o for o in chunks if o["metadata"]["uid"] == uid]
    assert cells[2] == f"{obj['status']['num_chunks']} / {obj['status']['num_chunks']}"
    assert obj["status"]["rows_delivered"] == len(ids)
    if shots() and not live:
        save_screenshot(browser, shots() / "console-list.png")
    assert not [e for e in console_errors(browser) if "favicon" not in e]


def test_step_4_tries_a_transform_on_sample_rows_then_the_backfill_delivers_what_it_makes(
    k8s, operator, kafka, seeded, org, api_base, browser
):
    sign_in(browser, api_base, make_key(k8s, org))
    fill_start_form(browser, api_base, name="console transform", topic="console-transform", window=WEEK)
    browser.find_element(By.ID, "filter_values").send_keys("\n" + WETH)
    script = browser.find_element(By.ID, "transform_script")

    # A script that does not compile: the preview's worker says where, under the script.
    script.send_keys("function transform(row) {\n  return row +;\n}")
    browser.find_element(By.ID, "preview-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "err-transform_script").is_displayed())
    said = browser.find_element(By.ID, "err-transform_script").text
    assert "transform 1 of 1 does not compile: SyntaxError: Unexpected token ';' at line 2, column 15" in said, said
    assert not browser.find_elements(By.ID, "p-rows")

    # Fixed: the preview shows the window's rows and the first rows as the transform makes them.
    script.clear()
    script.send_keys(DROP_WETH_AND_LABEL["script"])
    browser.find_element(By.ID, "preview-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.ID, "p-rows"))
    assert not browser.find_element(By.ID, "err-transform_script").is_displayed()
    usdc, weth = expected_ids(seeded, WEEK), expected_ids(seeded, WEEK, token=WETH)
    assert browser.find_element(By.ID, "p-rows").text == f"{len(usdc) + len(weth):,}"
    heading = browser.find_element(By.CSS_SELECTOR, "#preview-out h3").text
    assert "after the transform" in heading, heading
    samples = [json.loads(p.text) for p in browser.find_elements(By.CSS_SELECTOR, "pre.sample")]
    assert len(samples) == 5
    for row in samples:
        assert row["token_address"] == dataset.USDC and row["label"] == f"{row['token_symbol']}#{row['block_number']}"

    uid = submit(browser)
    [obj] = [
        o
        for o in k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills")["items"]
        if o["metadata"]["uid"] == uid
    ]
    assert obj["spec"]["transforms"] == [DROP_WETH_AND_LABEL], "the script as typed"
    wait_status(k8s, org, obj["metadata"]["name"], "completed", timeout=240)
    msgs = read_topic(kafka.bootstrap, f"{org}.console-transform")
    assert_exactly(msgs, usdc)
    assert all(row["label"] == f"{row['token_symbol']}#{row['block_number']}" for _, row in msgs)
    # The browser logs the refused preview's 422 (the broken script); nothing else.
    assert not [e for e in console_errors(browser) if "favicon" not in e and "api/preview" not in e]


def test_cancel_mid_transport_from_the_detail_page(k8s, operator, kafka, org, api_base, browser):
    key = make_key(k8s, org)
    sign_in(browser, api_base, key)
    fill_start_form(browser, api_base, name="console cancel", topic="console-cancel")
    uid = submit(browser)
    # The stack's Kafka proxy holds the workers' commits: transporting, not racing to the end.
    with kafka.proxy.holding(END_TXN, transactional_id=f"beam-{uid}-"):
        assert kafka.proxy.wait_held(1, timeout=180), "the transport worker never reached its commit"
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "d-status").text == "transporting")
        browser.find_element(By.CSS_SELECTOR, f'form[action="/console/backfills/{uid}/cancel"] button').click()
        WebDriverWait(browser, 10).until(lambda d: d.switch_to.alert).accept()
        WebDriverWait(browser, 90).until(lambda d: d.find_element(By.ID, "d-status").text == "cancelled")
    assert (
        k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills")["items"][0]["status"][
            "status"
        ]
        == "cancelled"
    )
    # The operator records the Event just after the status: wait for it in the cluster, then
    # the page (rendered at the status change) shows it once reloaded, as a user would.
    sel = f"involvedObject.uid={uid},reason=Cancelled"
    wait_for(lambda: k8s.api("GET", f"/api/v1/namespaces/{org}/events?fieldSelector={sel}")["items"], 30, "Event")
    browser.refresh()
    events = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, "table.events").text)
    assert "Cancelled" in events


def test_a_refused_spec_shows_its_message_next_to_its_field(k8s, operator, org, api_base, browser):
    sign_in(browser, api_base, make_key(k8s, org))
    fill_start_form(
        browser,
        api_base,
        name="",
        topic="refused",
        window={"start": "2026-04-01T00:00:00", "end": "2026-03-01T00:00:00"},
    )
    browser.find_element(By.CSS_SELECTOR, "#new-backfill .submit button").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "form-summary"))
    window_error = browser.find_element(By.ID, "err-window")
    assert window_error.is_displayed()
    assert window_error.text == "backfill_window.start (2026-04-01T00:00:00) must be before end (2026-03-01T00:00:00)"
    assert browser.find_element(By.ID, "err-job_name").text == "String should have at least 1 character"
    assert browser.find_element(By.ID, "job_name").get_attribute("aria-invalid") == "true"
    # what was typed is kept, and nothing was created
    assert browser.find_element(By.ID, "start").get_attribute("value") == "2026-04-01T00:00:00"
    assert k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills")["items"] == []


def test_a_job_name_full_of_html_is_shown_as_text(k8s, operator, org, api_url, api_base, browser):
    key = make_key(k8s, org)
    spec = {**backfill("x", "console-html")["spec"], "job_name": HOSTILE, "suspend": True}
    r = httpx.post(f"{api_url}/backfills", json=spec, headers={"X-API-Key": key}, timeout=30)
    assert r.status_code == 200, r.text
    uid = r.json()["job_id"]
    sign_in(browser, api_base, key)
    WebDriverWait(browser, 30).until(lambda d: row_text(d, uid))
    assert row_text(browser, uid)[0].splitlines()[0] == HOSTILE
    browser.get(f"{api_base}/console/backfills/{uid}")
    assert browser.find_element(By.ID, "job-name").text == HOSTILE
    assert "<script>document.title=" in browser.find_element(By.ID, "manifest").text
    for page in (f"{api_base}/console/backfills", f"{api_base}/console/backfills/{uid}"):
        browser.get(page)
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.TAG_NAME, "main"))
        assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == []
        assert browser.title != "pwned"
    # the session cookie is out of any script's reach
    assert browser.execute_script("return document.cookie") == ""


def test_another_organization_sees_none_of_it_and_forms_need_their_csrf_token(
    k8s, operator, org, namespace_factory, api_url, api_base, browser
):
    key = make_key(k8s, org)
    r = httpx.post(
        f"{api_url}/backfills",
        json={**backfill("x", "console-mine")["spec"], "job_name": "mine only", "suspend": True},
        headers={"X-API-Key": key},
        timeout=30,
    )
    uid = r.json()["job_id"]
    other = make_key(k8s, namespace_factory())

    sign_in(browser, api_base, other)
    assert "mine only" not in browser.find_element(By.ID, "jobs").text
    for path in (
        f"/console/backfills/{uid}",
        f"/console/api/backfills/{uid}",
        f"/console/backfills/{uid}/manifest.yaml",
    ):
        browser.get(api_base + path)
        assert "not found" in browser.find_element(By.TAG_NAME, "body").text, path

    with httpx.Client(base_url=api_base, timeout=30) as c:
        form = c.get("/console/sign-in")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        assert c.post("/console/sign-in", data={"key": key, "csrf": "wrong"}).status_code == 403
        signed = c.post("/console/sign-in", data={"key": key, "csrf": csrf})
        assert signed.status_code == 303
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
        assert key not in cookie
        # Without the page's token a cancel is refused, and the backfill is untouched.
        refused = c.post(f"/console/backfills/{uid}/cancel", data={})
        assert refused.status_code == 403 and "CSRF" in refused.text
        refused = c.post(
            f"/console/backfills/{uid}/cancel", data={"csrf": csrf}
        )  # the sign-in form's, not the session's
        assert refused.status_code == 403
        obj = k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills")["items"][0]
        assert not obj["spec"].get("cancel")
        page = c.get(f"/console/backfills/{uid}")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        assert c.post(f"/console/backfills/{uid}/cancel", data={"csrf": token}).status_code == 303
        obj = k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills")["items"][0]
        assert obj["spec"]["cancel"] is True
        # Signed out, the same cookie jar reaches nothing.
        assert c.post("/console/sign-out", data={"csrf": token}).status_code == 303
        assert c.get("/console/api/backfills").status_code == 401


@pytest.mark.parametrize("sample_rows", [3])
def test_the_preview_endpoint_counts_what_a_backfill_would_stage(k8s, operator, seeded, org, api_url, sample_rows):
    key = make_key(k8s, org)
    body = {**backfill("x", "preview")["spec"], "job_name": "preview"}
    with httpx.Client(base_url=api_url, headers={"X-API-Key": key}, timeout=60) as c:
        t0 = time.monotonic()
        r = c.post(f"/backfills/preview?sample_rows={sample_rows}", json=body)
        print(f"REST preview answered in {time.monotonic() - t0:.2f} s")  # docs/benchmarks.md quotes it
        assert r.status_code == 200, r.text
        p = r.json()
        assert p["num_rows"] == len(expected_ids(seeded))
        assert p["estimated_chunks"] >= 1 and p["estimated_bytes"] > 0
        assert len(p["sample"]) == sample_rows and all(row["token_address"] == dataset.USDC for row in p["sample"])
        assert [c["name"] for c in p["columns"]][:1] and "unique_id" in {c["name"] for c in p["columns"]}
        assert p["estimated_seconds"] > 0 and p["estimate_basis"]
        missing = c.post("/backfills/preview", json={**body, "table": dataset.TABLE + "_v9"})
        assert missing.status_code == 422
        assert "does not exist" in missing.json()["detail"], missing.text
    # Nothing is left behind: the previews and their Jobs are deleted once answered.
    left = k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beampreviews")["items"]
    assert [o for o in left if not o["metadata"].get("deletionTimestamp")] == []
    # The Snowflake credentials stay with the workers: the API can read no Secret of the org.
    sa = "system:serviceaccount:beam-system:beam-beam-backfill-api"
    can = k8s.kubectl("auth", "can-i", "get", "secrets", "-n", org, "--as", sa, check=False).stdout.strip()
    assert can == "no"
