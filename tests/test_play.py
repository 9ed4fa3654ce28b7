"""`play` end to end: the page's JSON API over HTTP, the terminal mode, and (where Debian's chromium
and chromedriver are installed) the page itself in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from pandora_lightning.inference.play import Play, serve, terminal
from pandora_lightning.world.history import check_history_action
from tests.test_session import tiny_model

SIZE = 32


def frame(color) -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[:] = color
    img[8:16, 8:16] = 255
    return img


@pytest.fixture(scope="module")
def server():
    play = Play(tiny_model(), [frame((20, 120, 40)), frame((10, 10, 40))], ["move left", "again"], check_history_action,
                name="tiny")
    srv = serve(play, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def call(base: str, method: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if resp.headers["Content-Type"] == "application/json" else raw
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_start_step_fork_download_and_bad_input(server):
    status, info = call(server, "GET", "/api/info")
    assert status == 200 and (info["height"], info["width"]) == (SIZE, SIZE) and len(info["starts"]) == 2
    status, s = call(server, "POST", "/api/sessions", {"start": 1, "seed": 3})
    assert status == 200 and s["rounds"] == []
    for action in ["move left", "again"]:
        status, s = call(server, "POST", f"/api/sessions/{s['id']}/step", {"action": action})
        assert status == 200
    assert [r["action"] for r in s["rounds"]] == ["move left", "again"] and len(s["rounds"][1]["frames"]) == 6
    status, fork = call(server, "POST", f"/api/sessions/{s['id']}/fork", {"round": 1})
    assert status == 200 and fork["parent"] == s["id"] and fork["rounds"] == s["rounds"][:1]
    status, fork = call(server, "POST", f"/api/sessions/{fork['id']}/step", {"action": "grow"})
    assert fork["rounds"][0] == s["rounds"][0] and fork["rounds"][1]["action"] == "grow"
    status, video = call(server, "GET", f"/api/sessions/{s['id']}/video.mp4")
    assert status == 200 and video[4:8] == b"ftyp"
    # an upload of another size and mode is converted and scaled, and the page is told so
    buf = io.BytesIO()
    Image.new("RGBA", (64, 48), (200, 30, 30, 255)).save(buf, format="PNG")
    upload = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    status, up = call(server, "POST", "/api/sessions", {"image": upload})
    assert status == 200 and "RGBA" in up["note"] and "48x64" in up["note"]
    # bad input: one line each
    for path, body, words in [
        (f"/api/sessions/{s['id']}/step", {"action": "  "}, "empty"),
        (f"/api/sessions/{s['id']}/step", {"action": "move " * 40}, "tokens long"),
        ("/api/sessions", {"image": "data:image/png;base64,AAAA"}, "cannot be read"),
        ("/api/sessions/99/step", {"action": "grow"}, "no session 99"),
    ]:
        status, err = call(server, "POST", path, body)
        assert status == 400 and words in err["error"] and "\n" not in err["error"]
    call(server, "POST", f"/api/sessions/{s['id']}/close")
    status, err = call(server, "POST", f"/api/sessions/{s['id']}/fork", {"round": 1})
    assert status == 400 and "closed session" in err["error"]


def test_history_actions_on_a_model_without_history_are_refused():
    play = Play(tiny_model(history_rounds=1), [frame((20, 120, 40))], check_action=check_history_action)
    key = play.start({"start": 0})["id"]
    play.step(key, {"action": "move left"})
    with pytest.raises(ValueError, match="trained without history"):
        play.step(key, {"action": "do it again"})


def test_terminal_mode_steps_forks_and_saves(tmp_path):
    out = []
    play = Play(tiny_model(), check_action=check_history_action)
    lines = ["move left", "again", ":fork 1", "grow", ":branches", "", ":save", "nonsense command with far too many words " * 6, ":quit"]
    terminal(play, frame((20, 120, 40)), tmp_path, lines, out.append, color=False)
    text = "\n".join(out)
    assert "round 2: again" in text and "branch 1: from round 1" in text and "round 2: grow" in text
    assert "error: the action is" in text
    assert (tmp_path / "rollout.mp4").is_file() and (tmp_path / "actions.txt").read_text().split("\n")[:2] == ["move left", "grow"]


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_page_in_headless_chromium(server, tmp_path):
    from tests.webdriver import Browser

    browser = Browser()
    try:
        browser.get(server + "/")
        browser.wait("return document.querySelectorAll('.thumb').length == 2")
        browser.click(".thumb[data-index='1']")
        browser.click("#new")
        browser.wait("return document.querySelectorAll('#episode .row').length == 1")
        for rows, action in enumerate(["move left", "again"], 2):
            browser.type("#action", action)
            browser.click("#go")
            browser.wait(f"return document.querySelectorAll('#episode .row').length == {rows}", timeout=300)
        assert browser.script("return document.querySelector('#player').src").startswith("data:image/png")
        browser.type("#action", "   ")
        browser.click("#go")
        assert "empty" in browser.wait("return document.querySelector('#error').textContent")
        browser.click("#episode .row[data-round='1'] button.fork")
        browser.wait("return document.querySelector('#sid').textContent.includes('forked from')")
        assert len(browser.find_all("#episode .row")) == 2
        browser.type("#action", "grow")
        browser.click("#go")
        browser.wait("return document.querySelectorAll('#episode .row').length == 3", timeout=300)
        labels = browser.script("return [...document.querySelectorAll('#episode .label')].map(e => e.textContent)")
        assert labels == ["start", "round 1: move left", "round 2: grow"]
        href = browser.script("return document.querySelector('#download').href")
        with urllib.request.urlopen(href, timeout=60) as resp:
            assert resp.read()[4:8] == b"ftyp"
        browser.screenshot(str(tmp_path / "play.png"))
        assert (tmp_path / "play.png").stat().st_size > 1000
    finally:
        browser.close()
