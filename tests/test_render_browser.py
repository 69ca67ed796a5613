"""The render page in a real browser (headless Chromium): every player loads its FLAC's metadata and
every spectrogram decodes, opened from disk (file://) and from a static web server.

Needs Debian's chromium (``bash tools/install_system.sh --test``). The page is checked through a copy with an
inline script that, after load, waits for each <audio> element's metadata and writes the results into
the DOM, which ``--dump-dom`` prints; a screenshot is kept under ``artifacts/``.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading

import pytest

import renderkit
from pipeline import render, storage
from pipeline.report.spectrogram import FIGURE_PIXELS

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts")


@pytest.fixture(autouse=True)
def chromium_installed():
    if not os.path.exists(CHROMIUM):
        pytest.fail("needs chromium: bash tools/install_system.sh --test (tools/test.sh runs it)")

CHECK_SCRIPT = """<script>
window.addEventListener("load", async () => {
  const audios = [...document.querySelectorAll("audio")];
  const durations = await Promise.all(audios.map(a => new Promise(resolve => {
    if (a.readyState >= 1) return resolve(a.duration);
    if (a.error) return resolve(-1);  // failed before this script ran
    a.addEventListener("loadedmetadata", () => resolve(a.duration));
    a.addEventListener("error", () => resolve(-1));
    setTimeout(() => resolve(-2), 15000);  // never settled
  })));
  // Every player plays: play() resolves and the element is playing (an error's text otherwise).
  const played = await Promise.all(audios.map(a => {
    a.muted = true;
    return a.play().then(() => { const playing = !a.paused; a.pause(); return playing; }, e => String(e));
  }));
  const images = [...document.querySelectorAll("img")].map(i => i.complete ? [i.naturalWidth, i.naturalHeight] : [-1, -1]);
  const scroll = {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth};
  const out = document.createElement("pre");
  out.id = "cantus-check";
  out.textContent = JSON.stringify({durations, played, images, scroll});
  document.body.appendChild(out);
});
</script>"""


def chromium(*args: str, user_data_dir: str) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage",  # a container's /dev/shm is often 64 MB
               f"--user-data-dir={user_data_dir}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def check_page(url: str, tmp_path, name: str) -> dict:
    dom = chromium("--virtual-time-budget=30000", "--window-size=1400,900", "--autoplay-policy=no-user-gesture-required",
                   "--dump-dom", url, user_data_dir=str(tmp_path / f"profile-{name}"))
    found = re.search(r'<pre id="cantus-check">(.*?)</pre>', dom, re.S)
    assert found, f"the check script did not finish on {url}"
    return json.loads(found.group(1).replace("&quot;", '"'))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    ckpt = str(tmp / "tiny.safetensors")
    renderkit.export_checkpoint(ckpt, renderkit.tiny_config())
    prompts = str(tmp / "prompts.jsonl")
    storage.write(prompts, b'{"prompt": "a flute & a <harp>", "seconds_start": 0, "seconds_total": 1}\n'
                           b'{"id": "drums", "prompt": "drums", "seconds_start": 0, "seconds_total": 1}\n')
    out = str(tmp / "site")
    assert render.main(["--checkpoints", ckpt, "--prompts", prompts, "--output", out, "--cfg-scales", "1,3,6,9",
                        "--seeds", "0", "--steps", "2", "--seconds", "0.25"]) == 0
    page = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    with open(os.path.join(out, "check.html"), "w", encoding="utf-8") as f:
        f.write(page.replace("</body>", CHECK_SCRIPT + "\n</body>"))
    return out


def assert_all_loaded(result: dict) -> None:
    assert len(result["durations"]) == 8  # 2 prompts x 4 CFG: 4 images of 480 px would not fit side by side
    assert all(d == pytest.approx(0.25, abs=0.01) for d in result["durations"]), result
    assert result["played"] == [True] * 8, result
    # Spectrograms are plots with axes and a colour bar: their full size, not a bare band x frame grid.
    assert result["images"] == [list(FIGURE_PIXELS)] * 8, result
    # Laid out at 1400 px, the page does not scroll sideways.
    assert result["scroll"]["innerWidth"] == 1400 and result["scroll"]["scrollWidth"] <= 1400, result


def test_page_opened_from_disk_plays_every_clip_and_shows_every_spectrogram(rendered, tmp_path):
    assert_all_loaded(check_page("file://" + os.path.join(rendered, "check.html"), tmp_path, "file"))
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "render_page.png")
    if os.path.exists(shot):
        os.remove(shot)
    chromium(f"--screenshot={shot}", "--window-size=1400,900", "--virtual-time-budget=20000", "file://" + os.path.join(rendered, "index.html"),
             user_data_dir=str(tmp_path / "profile-shot"))
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_page_served_as_a_static_site_loads_the_same(rendered, tmp_path):
    handler = functools.partial(QuietHandler, directory=rendered)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert_all_loaded(check_page(f"http://127.0.0.1:{server.server_address[1]}/check.html", tmp_path, "http"))
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".flac": "audio/flac"}

    def log_message(self, *args) -> None:
        pass


def test_chromium_check_catches_a_broken_clip(rendered, tmp_path):
    """The check can fail: a page whose FLAC is corrupt reports it."""
    broken = str(tmp_path / "broken")
    shutil.copytree(rendered, broken)
    victim = next(os.path.join(d, f) for d, _, fs in os.walk(broken) for f in fs if f.endswith(".flac"))
    with open(victim, "wb") as f:
        f.write(b"not a flac file")
    result = check_page("file://" + os.path.join(broken, "check.html"), tmp_path, "broken")
    assert sorted(d > 0 for d in result["durations"]) == [False] + [True] * 7
    assert sum(p is True for p in result["played"]) == 7
