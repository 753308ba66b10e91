"""The playground page at /ui, driven in a real headless Chromium (Debian's `chromium` and `chromium-driver`)
against `bentoml serve` of the tiny model: fill the form, generate, play the clip, check what the page shows."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
import soundfile
import yaml
from bentoml.exceptions import BentoMLException
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from stable_audio_bento.audio import format_unavailable
from stable_audio_bento.local_server import local_server
from stable_audio_bento.protocol import MAX_SEED

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
PAGE = REPO / "src" / "stable_audio_bento" / "static" / "playground.html"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"  # given explicitly, so Selenium Manager never runs (it would download)
GENERATION_TIMEOUT_S = 120
PROMPT = "Rain on a tin roof"


def test_the_page_is_self_contained_and_shipped_in_the_bento():
    """No build step and no network: inline CSS and JS only; bentofile.yaml's `include` carries the file."""
    html = PAGE.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert "@import" not in html and "<script src" not in html
    include = yaml.safe_load((REPO / "bentofile.yaml").read_text())["include"]
    assert any(fnmatch.fnmatch(str(PAGE.relative_to(REPO)), pattern) for pattern in include)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium chromium-driver (Debian) for the browser tests")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--autoplay-policy=no-user-gesture-required",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def open_page(browser, url: str) -> None:
    browser.get(url + "/ui")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    browser.get_log("browser")  # from here on, the console holds this page's messages only
    # /health filled in the model and its maximum length
    wait_for(browser, lambda: "Hz" in text(browser, "server-info"), 30, "the page never showed /health's answer")


def text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def fill(browser, **fields) -> None:
    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        if element.tag_name == "select":
            Select(element).select_by_value(value)
        else:
            element.clear()
            element.send_keys(str(value))


def wait_for(browser, condition, timeout_s: float, message: str):
    try:
        return WebDriverWait(browser, timeout_s, poll_frequency=0.1).until(lambda _: condition())
    except TimeoutException:
        raise AssertionError(f"{message}; status: {text(browser, 'status')!r}, error: {text(browser, 'error')!r}, "
                             f"console: {browser.get_log('browser')}") from None


def wait_for_clip(browser) -> dict:
    """Waits until the player has the clip's metadata and the waveform was decoded; returns the page's state."""
    state = """
        const audio = document.getElementById("audio"), progress = document.getElementById("progress"),
              link = document.getElementById("download");
        return {ready: audio.readyState, duration: audio.duration, error: audio.error && audio.error.code,
                progress: progress.value, progressMax: progress.max, href: link.getAttribute("href"),
                filename: link.download, decoded: document.getElementById("duration").textContent};
    """
    return wait_for(browser, lambda: (s := browser.execute_script(state))["ready"] >= 1 and s["decoded"] != "–" and s,
                    GENERATION_TIMEOUT_S, "the clip never reached the player")


def waveform_coverage(browser) -> list[float]:
    """Per channel lane of the canvas: the fraction of pixel columns where the waveform is drawn."""
    return browser.execute_script("""
        const canvas = document.getElementById("waveform"), {width, height} = canvas;
        const pixels = canvas.getContext("2d").getImageData(0, 0, width, height).data;
        const colors = [[0x34, 0x51, 0xb2], [0x0e, 0x7c, 0x66]];  // the page's colours for channels 1 and 2
        return colors.map(([r, g, b], lane) => {
            let columns = 0;
            for (let x = 0; x < width; x++) {
                for (let y = Math.floor(lane * height / 2); y < (lane + 1) * height / 2; y++) {
                    const i = (y * width + x) * 4;
                    if (pixels[i] === r && pixels[i + 1] === g && pixels[i + 2] === b && pixels[i + 3] === 255) {
                        columns++; break;
                    }
                }
            }
            return columns / width;
        });
    """)


def steps_done(browser) -> float:
    return browser.execute_script("return document.getElementById('progress').value")


def stored_job(browser) -> str | None:
    """What the page keeps in sessionStorage to follow its job after a reload."""
    return browser.execute_script("return sessionStorage.getItem('stable-audio-job')")


def play(browser) -> dict:
    """Plays the clip for about half a second and reports where the playhead got to."""
    return browser.execute_async_script("""
        const done = arguments[arguments.length - 1], audio = document.getElementById("audio");
        audio.currentTime = 0;
        audio.play().then(() => setTimeout(() => done({currentTime: audio.currentTime, paused: audio.paused,
                                                        error: audio.error && audio.error.code}), 600),
                          (error) => done({rejected: String(error)}));
    """)


def downloaded_sha256(browser) -> str:
    return browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById("download").href).then((r) => r.arrayBuffer())
            .then((bytes) => crypto.subtle.digest("SHA-256", bytes))
            .then((hash) => done([...new Uint8Array(hash)].map((b) => b.toString(16).padStart(2, "0")).join("")),
                  (error) => done(String(error)));
    """)


def test_generate_play_and_download_a_clip(server, browser):
    open_page(browser, server)
    assert browser.find_element(By.ID, "audio_length").get_attribute("max") == "47.55"
    fill(browser, input=PROMPT, audio_length="2.0", num_inference_steps=3, seed=7)
    browser.find_element(By.ID, "generate").click()

    clip = wait_for_clip(browser)
    assert clip["error"] is None
    assert clip["duration"] == pytest.approx(2.0, abs=0.05)
    assert clip["decoded"].startswith("2.000 s · 2 ch")
    assert clip["progress"] == clip["progressMax"] == 3  # the bar reached the requested steps
    assert text(browser, "seed-used") == "7"
    assert clip["href"].startswith("blob:")
    assert clip["filename"] == "stable-audio-7.wav"
    assert browser.find_element(By.ID, "generate").is_enabled()
    assert not browser.find_element(By.ID, "cancel").is_displayed()

    assert min(waveform_coverage(browser)) > 0.95  # both channels drawn across the whole width

    # The link offers exactly the bytes the synchronous API returns for the same request.
    body = {"input": PROMPT, "audio_length": 2.0, "num_inference_steps": 3, "seed": 7, "guidance_scale": 7.0,
            "audio_start": 0.0, "response_format": "wav"}
    direct = httpx.post(server + "/v1/audio/generate", json=body, timeout=GENERATION_TIMEOUT_S)
    assert direct.status_code == 200, direct.text
    assert downloaded_sha256(browser) == hashlib.sha256(direct.content).hexdigest()

    played = play(browser)
    assert "rejected" not in played, played
    assert played["error"] is None
    assert not played["paused"] and played["currentTime"] > 0.1
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "playground.png"))


@pytest.mark.parametrize("response_format, tolerance_s", [("flac", 0.01), ("mp3", 0.05), ("opus", 0.05),
                                                          ("aac", 0.1)])
def test_every_playable_format_plays_with_the_largest_seed(server, browser, response_format, tolerance_s):
    """Opus and AAC players add up to a few tens of ms (resampling to 48 kHz; ADTS keeps its encoder padding)."""
    if (reason := format_unavailable(response_format)) is not None:
        pytest.skip(reason)
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length="1.3", num_inference_steps=2, seed=MAX_SEED,
         response_format=response_format)
    browser.find_element(By.ID, "generate").click()
    clip = wait_for_clip(browser)
    assert clip["error"] is None
    assert clip["duration"] == pytest.approx(1.3, abs=tolerance_s)
    assert text(browser, "seed-used") == str(MAX_SEED)  # all 20 digits: no float rounding in the page
    assert clip["filename"] == f"stable-audio-{MAX_SEED}.{response_format}"
    played = play(browser)
    assert "rejected" not in played and played["error"] is None and played["currentTime"] > 0.1, played


def test_a_bad_value_shows_the_servers_message_on_its_field(server, browser):
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length=100, num_inference_steps=3)
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "error"), 30, "no error was shown")
    message = text(browser, "error")
    assert "audio_length" in message and "47.55" in message, message
    field = browser.find_element(By.ID, "audio_length")
    assert "invalid" in field.get_attribute("class")
    assert field.get_attribute("aria-invalid") == "true"
    assert "audio_length" in text(browser, "audio_length-error")
    assert browser.switch_to.active_element == field
    assert text(browser, "job-id") == "–"  # nothing was submitted
    assert browser.find_element(By.ID, "generate").is_enabled()
    browser.save_screenshot(str(ARTIFACTS / "playground-error.png"))

    fill(browser, audio_length=1)  # editing the field clears its mark
    assert "invalid" not in field.get_attribute("class")


def test_a_value_the_page_itself_refuses_says_nothing_was_sent(server, browser):
    open_page(browser, server)
    fill(browser, input=PROMPT, seed="12x")
    browser.find_element(By.ID, "generate").click()
    assert text(browser, "status") == "Nothing was sent: fix the highlighted field."
    assert browser.find_element(By.ID, "seed").get_attribute("aria-invalid") == "true"
    assert text(browser, "job-id") == "–"


def test_cancel_stops_a_running_job(server, browser):
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length=47, num_inference_steps=100)
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "progress-text").startswith("Denoising: step"), 60, "the job never ran")
    assert text(browser, "status") == "Running…"  # announced once, not at every step
    progress = browser.execute_script("const p = document.getElementById('progress'); return [p.value, p.max]")
    assert progress[1] == 100 and 0 <= progress[0] < 100
    assert browser.find_element(By.ID, "cancel").is_displayed()
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda: text(browser, "status") == "Cancelled.", 30, "the job was not cancelled")
    assert browser.find_element(By.ID, "generate").is_enabled()
    assert browser.find_element(By.ID, "download").get_attribute("href") is None
    job_id = text(browser, "job-id")
    assert httpx.get(f"{server}/v1/audio/jobs/{job_id}").json()["status"] == "cancelled"


def test_the_keyboard_focus_goes_to_generate_when_cancel_is_hidden(server, browser):
    """Whether Cancel was pressed from the keyboard or the job ended while Cancel had the focus."""
    open_page(browser, server)
    generate, cancel = browser.find_element(By.ID, "generate"), browser.find_element(By.ID, "cancel")
    fill(browser, input=PROMPT, audio_length=47, num_inference_steps=400)
    generate.click()
    wait_for(browser, lambda: steps_done(browser) > 0, 60, "the job never ran")
    cancel.send_keys(Keys.ENTER)
    wait_for(browser, lambda: text(browser, "status") == "Cancelled.", 30, "the job was not cancelled")
    assert browser.switch_to.active_element == generate

    fill(browser, audio_length="1.0", num_inference_steps=2)
    generate.click()
    browser.execute_script("document.getElementById('cancel').focus()")
    wait_for(browser, lambda: text(browser, "status").startswith("Done: "), GENERATION_TIMEOUT_S, "the job never ended")
    assert not cancel.is_displayed() and browser.switch_to.active_element == generate


def test_ctrl_enter_and_cancel_while_the_job_is_being_submitted(server, browser):
    """Before the server has answered the job's POST (held back here for 1.5 s): Ctrl+Enter, which submits even
    while the Generate button is disabled, sends no second job, and Cancel cancels the job once it is accepted."""
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length=47, num_inference_steps=400)
    browser.execute_script("""
        const fetchNow = window.fetch;
        window.jobPosts = 0;
        window.fetch = (path, options) => {
          if (!options || options.method !== "POST") return fetchNow(path, options);
          window.jobPosts++;
          return new Promise((resolve) => setTimeout(resolve, 1500)).then(() => fetchNow(path, options));
        };""")
    browser.find_element(By.ID, "generate").click()
    browser.find_element(By.ID, "input").send_keys(Keys.CONTROL, Keys.ENTER)
    assert browser.execute_script("return window.jobPosts") == 1
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda: text(browser, "status") == "Cancelled.", 30, "the job was not cancelled")
    assert browser.find_element(By.ID, "generate").is_enabled()
    job_id = text(browser, "job-id")
    assert httpx.get(f"{server}/v1/audio/jobs/{job_id}").json()["status"] == "cancelled"


def fail_fetches(browser, polls: str, downloads: str) -> None:
    """From now on the page's polls of its job and its downloads are answered by the JavaScript expressions
    ``polls`` and ``downloads`` (a promise of a Response, or a rejection as for a dropped connection) while they
    are not null; window.failedPolls and window.failedDownloads count those answers."""
    browser.execute_script(f"""
        const fetchNow = window.fetch;
        window.failedPolls = 0; window.failedDownloads = 0;
        window.fetch = (path, options) => {{
          if (!options || !options.method) {{
            const download = /\\/content$/.test(path), poll = /^v1\\/audio\\/jobs\\/[^/]+$/.test(path);
            const answer = poll ? ({polls}) : download ? ({downloads}) : null;
            if (answer) {{ download ? window.failedDownloads++ : window.failedPolls++; return answer; }}
          }}
          return fetchNow(path, options);
        }};""")


def test_an_unreachable_server_and_a_bad_gateway_are_waited_out(server, browser):
    """Polls that get no answer (the server restarting, a dropped connection) say so in the status while the job
    goes on; once the server answers again the clip arrives. A download a proxy answers 502 is tried again."""
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length="2.0", num_inference_steps=3, seed=7)
    fail_fetches(browser, polls='window.failedPolls < 3 ? Promise.reject(new TypeError("Failed to fetch")) : null',
                 downloads='window.failedDownloads < 2 ? Promise.resolve(new Response("bad gateway", {status: 502}))'
                           ' : null')
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "status") == "Server unreachable: the job goes on there; retrying…", 30,
             "the outage was not shown")
    assert text(browser, "error") == "" and browser.find_element(By.ID, "cancel").is_displayed()
    wait_for(browser, lambda: text(browser, "status") == "Server answered HTTP 502: retrying the download…", 30,
             "the failed download was not shown")
    clip = wait_for_clip(browser)
    assert clip["duration"] == pytest.approx(2.0, abs=0.05)
    assert browser.execute_script("return [window.failedPolls, window.failedDownloads]") == [3, 2]
    assert text(browser, "status").startswith("Done: ") and text(browser, "error") == ""


def answer_posts(browser, answer: str) -> None:
    """From now on the page's POSTs are answered by the JavaScript expression ``answer``, in which ``n`` is the
    POST's number (1 for the first) and ``sent()`` sends it to the server for real; window.postKeys keeps each
    one's Idempotency-Key, window.postAnswers the [job id, Idempotent-Replayed] of each the server answered."""
    browser.execute_script(f"""
        const fetchNow = window.fetch;
        window.postKeys = []; window.postAnswers = [];
        window.fetch = (path, options) => {{
          if (!options || options.method !== "POST") return fetchNow(path, options);
          window.postKeys.push(options.headers["Idempotency-Key"]);
          const n = window.postKeys.length;
          const sent = () => {{
            const answered = fetchNow(path, options);
            answered.then((r) => r.clone().json().then((job) =>
              window.postAnswers.push([job.id, r.headers.get("Idempotent-Replayed")])));
            return answered;
          }};
          return ({answer});
        }};""")


LOST_ANSWERS = {  # the server makes the job; its answer does not reach the page
    "no answer": 'n === 1 ? sent().then(() => Promise.reject(new TypeError("Failed to fetch"))) : sent()',
    "body cut": 'n === 1 ? sent().then((r) => new Response(new ReadableStream({start(c) { '
                'c.error(new TypeError("network error")); }}), {status: r.status, headers: r.headers})) : sent()',
}


@pytest.mark.parametrize("lost", LOST_ANSWERS)
def test_a_submission_whose_answer_is_lost_is_sent_again_and_follows_the_job_the_first_made(server, browser, lost):
    """The page sends it again with the same Idempotency-Key and is answered with the first's job, not a second."""
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length="2.0", num_inference_steps=3, seed=8)
    answer_posts(browser, LOST_ANSWERS[lost])
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "status") == "Server unreachable: submitting again…", 30,
             "the lost answer was not shown")
    clip = wait_for_clip(browser)
    assert clip["duration"] == pytest.approx(2.0, abs=0.05) and text(browser, "error") == ""
    keys, answers = browser.execute_script("return [window.postKeys, window.postAnswers]")
    assert len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) == 32
    [(first_id, first_replayed), (second_id, second_replayed)] = answers
    assert first_id == second_id == text(browser, "job-id") and (first_replayed, second_replayed) == (None, "true")


REFUSED_FOR_NOW = 'Promise.resolve(new Response("{}", {status: %d, headers: {"Retry-After": "%s"}}))'


def test_cancel_ends_the_wait_to_submit_again_at_once_and_nothing_more_is_sent(server, browser):
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length="2.0", num_inference_steps=3)
    answer_posts(browser, REFUSED_FOR_NOW % (429, "30"))
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "status") == "Server answered HTTP 429: submitting again…", 10,
             "the refusal was not shown")
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda: browser.find_element(By.ID, "generate").is_enabled(), 3, "Cancel waited out the 30 s")
    assert text(browser, "status").startswith("Cancelled before the server answered")
    assert browser.execute_script("return window.postKeys.length") == 1


def test_a_retry_after_date_or_a_copy_in_use_is_waited_for_and_cancel_says_what_happened(server, browser):
    """A Retry-After that is an HTTP date waits the page's own second (it fired at once: 39,000 POSTs in 3 s); a 409
    (a copy still being taken) after Cancel is not "refused"."""
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length="2.0", num_inference_steps=3)
    answer_posts(browser, 'n === 1 ? ' + REFUSED_FOR_NOW % (503, "Wed, 21 Oct 2015 07:28:00 GMT")
                 + ' : ' + REFUSED_FOR_NOW % (409, "1"))
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "status") == "Server answered HTTP 409: submitting again…", 10,
             "the second try was not sent")
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda: browser.find_element(By.ID, "generate").is_enabled(), 3, "Cancel did not end it")
    assert browser.execute_script("return window.postKeys.length") <= 3
    assert text(browser, "status").startswith("Cancelled before the server answered")


def test_a_request_the_browser_cannot_send_fails_at_once_on_the_api_key_field(server, browser):
    """A key pasted with a character no header can carry: no retry can send it."""
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length="2.0", num_inference_steps=3)
    browser.execute_script('document.getElementById("api_key").value = "sk-secret\u2026";')
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: browser.find_element(By.ID, "generate").is_enabled(), 5, "it was retried")
    assert text(browser, "status") == "Not sent: the browser cannot send the request."
    assert text(browser, "api_key-error").startswith("the browser cannot send this request")


def test_a_poll_answered_by_a_page_that_is_not_the_job_is_retried(server, browser):
    """A proxy's page with a 200 in place of the job's status: said in the status, and polled again until the
    job's own answer comes."""
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length="1.0", num_inference_steps=3, seed=7)
    fail_fetches(browser, downloads="null",
                 polls='window.failedPolls < 3 ? Promise.resolve(new Response("<html>proxy</html>")) : null')
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "status") == "The server's answer was not the job's status; retrying…",
             30, "the page that is not the job was not shown")
    clip = wait_for_clip(browser)
    assert clip["duration"] == pytest.approx(1.0, abs=0.05) and text(browser, "error") == ""
    assert browser.execute_script("return window.failedPolls") == 3


def test_a_job_the_server_no_longer_has_is_reported_lost(server, browser):
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length="1.0", num_inference_steps=3)
    fail_fetches(browser, downloads="null", polls='Promise.resolve(new Response(JSON.stringify({error: {message: '
                 '"no job", type: "not_found", param: "job_id", code: null}}), {status: 404}))')
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "status").startswith("Lost the job: the server no longer has it"), 30,
             "the lost job was not reported")
    assert "no job" in text(browser, "error") and browser.find_element(By.ID, "generate").is_enabled()


def test_a_reload_mid_job_follows_the_job_to_its_clip(server, browser):
    open_page(browser, server)
    fill(browser, input=PROMPT, audio_length="10", num_inference_steps=50, seed=11, response_format="flac")
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "job-id") != "–", 30, "the job was not accepted")
    job_id = text(browser, "job-id")
    browser.refresh()
    assert text(browser, "job-id") == job_id
    clip = wait_for_clip(browser)
    assert clip["duration"] == pytest.approx(10.0, abs=0.05) and clip["filename"] == "stable-audio-11.flac"
    assert text(browser, "seed-used") == "11" and text(browser, "error") == ""
    assert stored_job(browser) is None  # the job ended: the next load follows nothing
    browser.refresh()
    assert text(browser, "job-id") == "–" and browser.find_element(By.ID, "generate").is_enabled()


def test_a_job_gone_by_the_reload_is_reported_once(server, browser):
    open_page(browser, server)
    browser.execute_script("sessionStorage.setItem('stable-audio-job', JSON.stringify("
                           "{id: 'job_gone', format: 'wav', seed: '1', started: Date.now()}))")
    browser.refresh()
    wait_for(browser, lambda: text(browser, "status").startswith("Lost the job: the server no longer has it"), 30,
             "the lost job was not reported")
    assert stored_job(browser) is None and browser.find_element(By.ID, "generate").is_enabled()
    browser.refresh()
    assert text(browser, "status") == "Fill in a prompt and press Generate."


@pytest.fixture(scope="module")
def keyed_server(model_cache, tmp_path_factory):
    """Default guard settings with an API key: /ui must stay open (GuardSettings.public_paths), the API not."""
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text("playground-secret\n")
    env = {"STABLE_AUDIO_MODEL": "tiny", "STABLE_AUDIO_API_KEY_FILE": str(key_file)}
    with local_server(env, ARTIFACTS / "server-playground-keyed.log", startup_timeout_s=180) as url:
        yield url


def test_with_a_key_the_probes_and_the_page_stay_open_and_nothing_else(keyed_server):
    """The default public paths: a Kubernetes probe or a load balancer's health check has no key."""
    for path in ("/health", "/healthz", "/livez", "/readyz", "/ui", "/schema.json"):
        assert httpx.get(keyed_server + path, timeout=30).status_code == 200, path
    for path in ("/metrics", "/docs", "/docs.json", "/v1/models"):
        assert httpx.get(keyed_server + path, timeout=30).status_code == 401, path


def test_bentomls_client_without_the_key_is_told_401_not_500(keyed_server):
    """It reads /schema.json when it opens: behind the key, that failed as "500 Failed to fetch schema"."""
    with bentoml.SyncHTTPClient(keyed_server, timeout=60) as client:
        with pytest.raises(BentoMLException) as refused:
            client.generate(input=PROMPT, audio_length=0.5, num_inference_steps=1)
    assert refused.value.error_code == 401 and "invalid_api_key" in str(refused.value)
    with bentoml.SyncHTTPClient(keyed_server, timeout=60, token="playground-secret") as client:
        assert soundfile.info(client.generate(input=PROMPT, audio_length=0.5, num_inference_steps=1)).frames == 22050


def test_api_key_is_asked_for_and_sent(keyed_server, browser):
    page = httpx.get(keyed_server + "/ui")
    assert page.status_code == 200, "the page itself needs no key: '/ui' belongs in GuardSettings.public_paths"
    assert page.headers["x-frame-options"] == "DENY"  # another site cannot frame it and have the key typed in
    open_page(browser, keyed_server)
    fill(browser, input=PROMPT, audio_length=1, num_inference_steps=2, seed=3)
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "error"), 30, "no error without the key")
    assert "API key" in text(browser, "error")
    assert browser.find_element(By.ID, "api_key").get_attribute("aria-invalid") == "true"

    fill(browser, api_key="playground-secret")
    browser.find_element(By.ID, "generate").click()
    clip = wait_for_clip(browser)
    assert clip["duration"] == pytest.approx(1.0, abs=0.05)
    assert text(browser, "error") == ""

    browser.refresh()  # kept for the tab (sessionStorage), not beyond
    assert browser.find_element(By.ID, "api_key").get_attribute("value") == "playground-secret"


def test_typing_in_the_key_field_mid_job_leaves_the_job_its_own_key(keyed_server, browser):
    """The job is polled and cancelled with the key it was submitted with, not one half typed meanwhile."""
    open_page(browser, keyed_server)
    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()  # where the key field is
    fill(browser, input=PROMPT, audio_length=47, num_inference_steps=400, api_key="playground-secret")
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: steps_done(browser) > 0, 60, "the job never ran")
    browser.find_element(By.ID, "api_key").send_keys("x")
    done = steps_done(browser)
    wait_for(browser, lambda: steps_done(browser) > done, 30, "the page stopped following the job")
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda: text(browser, "status") == "Cancelled.", 30, "the job was not cancelled")
    assert text(browser, "error") == ""
    job = httpx.get(f"{keyed_server}/v1/audio/jobs/{text(browser, 'job-id')}",
                    headers={"Authorization": "Bearer playground-secret"}, timeout=30).json()
    assert job["status"] == "cancelled"


def test_a_reload_without_the_key_asks_for_it_and_then_follows_the_job(keyed_server, browser):
    open_page(browser, keyed_server)
    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    fill(browser, input=PROMPT, audio_length="2.0", num_inference_steps=3, seed=4, api_key="playground-secret")
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "job-id") != "–", 30, "the job was not accepted")
    job_id = text(browser, "job-id")
    assert "playground-secret" not in stored_job(browser)
    browser.execute_script("sessionStorage.removeItem('stable-audio-api-key')")
    browser.refresh()
    wait_for(browser, lambda: text(browser, "status").startswith("The server wants the API key to follow job"), 30,
             "the missing key was not asked for")
    assert job_id in stored_job(browser) and text(browser, "job-id") == job_id
    fill(browser, api_key="playground-secret")
    browser.find_element(By.ID, "input").click()  # leaving the key field: its change follows the job again
    clip = wait_for_clip(browser)
    assert clip["filename"] == "stable-audio-4.wav" and text(browser, "job-id") == job_id
    assert text(browser, "error") == ""


def test_what_was_typed_stays_when_the_key_lets_the_model_be_read(keyed_server, browser):
    """Without the key the form keeps its own defaults; entering it reads the model's, which fill only the fields
    the user has not typed in."""
    open_page(browser, keyed_server)
    fill(browser, num_inference_steps=3)
    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()  # where the key field is
    fill(browser, api_key="playground-secret")
    browser.find_element(By.ID, "input").click()  # leaving the key field: its change reads the model again
    steps = browser.find_element(By.ID, "num_inference_steps")
    wait_for(browser, lambda: steps.get_attribute("max") == "500", 30, "the model was not read with the key")
    assert steps.get_attribute("value") == "3"
    assert browser.find_element(By.ID, "guidance_scale").get_attribute("value") == "7"  # the model's default


def upload_file(tmp_path: Path, seconds: float = 0.4, rate: int = 48000) -> Path:
    t = np.arange(round(seconds * rate)) / rate
    path = tmp_path / "loop.wav"
    soundfile.write(path, np.stack([0.5 * np.sin(2 * np.pi * 330 * t), 0.5 * np.sin(2 * np.pi * 495 * t)], axis=1),
                    rate, subtype="PCM_16")
    return path


def test_edit_an_uploaded_file_and_play_it_beside_the_result(server, browser, tmp_path):
    loop = upload_file(tmp_path)
    open_page(browser, server)
    assert not browser.find_element(By.ID, "strength").is_enabled()  # until a file is chosen
    assert not browser.find_element(By.ID, "input-audio").is_displayed()
    browser.find_element(By.ID, "init_audio").send_keys(str(loop))
    fill(browser, input=PROMPT, audio_length="1.0", num_inference_steps=2, seed=5, strength="0.7")
    browser.find_element(By.ID, "trim_silence").click()
    browser.find_element(By.ID, "generate").click()

    clip = wait_for_clip(browser)
    assert clip["error"] is None
    assert clip["duration"] == pytest.approx(1.0, abs=0.05)  # the tiny model's noise has no silent end to trim
    sent = json.loads(browser.execute_script("return document.getElementById('request-json').textContent"))
    assert sent["strength"] == 0.7 and sent["trim_silence"] is True and sent["audio"] == "(file) loop.wav"

    player = browser.execute_script("""
        const audio = document.getElementById("input-audio");
        return {ready: audio.readyState, duration: audio.duration, error: audio.error && audio.error.code,
                shown: audio.offsetParent !== null};
    """)
    assert player["shown"] and player["ready"] >= 1 and player["error"] is None
    assert player["duration"] == pytest.approx(0.4, abs=0.01)

    # The link offers exactly the bytes the synchronous edit route returns for the same form and file.
    form = {"input": json.dumps(PROMPT), "audio_length": "1", "audio_start": "0", "num_inference_steps": "2",
            "guidance_scale": "7", "strength": "0.7", "trim_silence": "true", "response_format": '"wav"', "seed": "5"}
    assert_download_is_the_direct_edit(browser, server, form, loop)
    browser.save_screenshot(str(ARTIFACTS / "playground-edit.png"))


def test_the_least_strength_the_field_offers_is_one_the_server_takes(server, browser, tmp_path):
    open_page(browser, server)
    browser.find_element(By.ID, "init_audio").send_keys(str(upload_file(tmp_path)))
    strength = browser.find_element(By.ID, "strength")
    strength.send_keys(*[Keys.ARROW_DOWN] * 60)  # from 0.5, as far down as the field goes
    least = float(strength.get_attribute("value"))
    assert least == float(strength.get_attribute("min")) and least > 0
    fill(browser, input=PROMPT, audio_length="1.0", num_inference_steps=1)
    browser.find_element(By.ID, "generate").click()
    clip = wait_for_clip(browser)
    assert clip["error"] is None and text(browser, "error") == ""
    sent = json.loads(browser.execute_script("return document.getElementById('request-json').textContent"))
    assert sent["strength"] == least


def assert_download_is_the_direct_edit(browser, server: str, form: dict, upload: Path) -> None:
    """The page's download link holds exactly the bytes /v1/audio/edits returns for the same form and file, and the
    page logged no error."""
    direct = httpx.post(server + "/v1/audio/edits", data=form, files={"audio": (upload.name, upload.read_bytes())},
                        timeout=GENERATION_TIMEOUT_S)
    assert direct.status_code == 200, direct.text
    assert downloaded_sha256(browser) == hashlib.sha256(direct.content).hexdigest()
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]

def test_an_unusable_upload_is_marked_on_the_file_field(server, browser, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio at all " * 20)
    open_page(browser, server)
    browser.find_element(By.ID, "init_audio").send_keys(str(not_audio))
    fill(browser, input=PROMPT, audio_length="1.0", num_inference_steps=2)
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda: text(browser, "error"), 30, "no error was shown")
    assert "audio" in text(browser, "error")
    assert browser.find_element(By.ID, "init_audio").get_attribute("aria-invalid") == "true"
    assert text(browser, "job-id") == "–"


def test_the_form_follows_a_stable_audio_3_model_and_inpaints(sa3_server, browser, tmp_path):
    # /v1/models: 8 steps and guidance 1 by default, no start offset, inpainting instead of only strength.
    loop = upload_file(tmp_path, seconds=2.0)
    open_page(browser, sa3_server)
    wait_for(browser, lambda: browser.find_element(By.ID, "num_inference_steps").get_attribute("value") == "8", 30,
             "the form never took the model's defaults")
    assert browser.find_element(By.ID, "guidance_scale").get_attribute("value") == "1"
    assert not browser.find_element(By.ID, "audio_start").is_enabled()
    assert browser.find_element(By.ID, "mask_start").is_displayed()
    assert not browser.find_element(By.ID, "mask_start").is_enabled()  # until a file is chosen
    browser.find_element(By.ID, "init_audio").send_keys(str(loop))
    fill(browser, input=PROMPT, audio_length="2.0", num_inference_steps=3, seed=7, mask_start="0.5", mask_end="1.5")
    browser.find_element(By.ID, "generate").click()

    clip = wait_for_clip(browser)
    assert clip["error"] is None and clip["duration"] == pytest.approx(2.0, abs=0.05)
    sent = json.loads(browser.execute_script("return document.getElementById('request-json').textContent"))
    assert (sent["mask_start"], sent["mask_end"]) == (0.5, 1.5)
    assert "strength" not in sent and "audio_start" not in sent  # neither applies here
    form = {"input": json.dumps(PROMPT), "audio_length": "2", "num_inference_steps": "3", "guidance_scale": "1",
            "mask_start": "0.5", "mask_end": "1.5", "response_format": '"wav"', "seed": "7"}
    assert_download_is_the_direct_edit(browser, sa3_server, form, loop)
    browser.save_screenshot(str(ARTIFACTS / "playground-sa3-inpaint.png"))


def test_a_stable_audio_3_edit_without_a_length_is_as_long_as_its_file(sa3_server, browser, tmp_path):
    """The form's own 10 s is not sent for an edit on a model whose edits default to the file's length."""
    loop = upload_file(tmp_path, seconds=2.0)
    open_page(browser, sa3_server)
    wait_for(browser, lambda: browser.find_element(By.ID, "num_inference_steps").get_attribute("value") == "8", 30,
             "the form never took the model's defaults")
    browser.find_element(By.ID, "init_audio").send_keys(str(loop))
    length = browser.find_element(By.ID, "audio_length")
    assert length.get_attribute("value") == "" and length.get_attribute("placeholder") == "the file's"
    fill(browser, input=PROMPT, num_inference_steps=2, seed=7, mask_start="1.5")
    browser.find_element(By.ID, "generate").click()
    clip = wait_for_clip(browser)
    assert clip["error"] is None and clip["duration"] == pytest.approx(2.0, abs=0.05)
    sent = json.loads(browser.execute_script("return document.getElementById('request-json').textContent"))
    assert "audio_length" not in sent and sent["mask_start"] == 1.5
