"""The web page at ``/`` in headless Chromium: chat, infill, and image upload with nearest neighbours."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers_serve import LiveServer
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")


def test_click_through_the_page(tmp_path):
    from playwright.sync_api import sync_playwright

    files = []
    for i, shade in enumerate((30, 200, 40)):  # the third is close to the first
        rng = np.random.default_rng(i)
        arr = np.clip(shade + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(arr).save(files[-1])
    with LiveServer(model="default", vision_model="default", parallel=2, ctx=512, dtype="fp32") as s, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(s.url + "/")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('models:')")
        page.fill("#chat-input", "write a loop")
        page.click("#chat-send")
        page.wait_for_selector("#chat-log pre.assistant[data-done='1']", timeout=60_000)
        shown = page.inner_text("#chat-log pre.assistant")
        _, api = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "write a loop"}],
                                                 "temperature": 0, "max_tokens": 256})
        assert shown.strip() == api["choices"][0]["message"]["content"].strip() and shown.strip()
        page.click("#infill-btn")
        page.wait_for_selector("#infill-out[data-done='1']", timeout=60_000)
        _, fim = s.post("/infill", {"input_prefix": page.input_value("#prefix"), "n_predict": 64, "temperature": 0,
                                    "input_suffix": page.input_value("#suffix")})
        assert page.inner_text("#infill-out") == fim["content"].strip() or page.text_content("#infill-out") == fim["content"]
        page.set_input_files("#image-file", [str(f) for f in files])
        page.wait_for_selector("#neighbours[data-count='3']", timeout=60_000)
        names = page.locator("#neighbours .name").all_inner_texts()
        assert names[0] == "img0.png" and set(names) == {"img0.png", "img1.png"}  # img2's nearest is img0
        assert page.locator("#uploads img").count() == 3
        browser.close()
