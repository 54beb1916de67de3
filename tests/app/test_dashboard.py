"""The dashboard in a real headless Chromium, served by uvicorn in-process."""

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.api import create_app
from app.report import PLOTS
from models.settings import Settings
from tests.app.conftest import Seeded, seed_store, serve_session
from tests.conftest import unavailable
from tests.factories import make_model_version

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def served(pg_session) -> Iterator[tuple[str, Seeded]]:
    """The app on a free loopback port, reading the test's rolled-back transaction."""
    seeded = seed_store(pg_session)
    app = create_app(Settings(api_token=None))
    serve_session(app, pg_session)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; uvicorn serves this socket
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", seeded
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_dashboard_filters_candidates_in_chromium(served):
    if not (os.path.exists(CHROMIUM) and shutil.which(CHROMIUM)):
        unavailable(f"Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    base, seeded = served
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(base + "/")
            assert page.locator("#iterations tbody tr").count() == 2
            images = page.locator(".plots img")
            assert images.count() == len(PLOTS)
            # The paper's question comes first: held-out pass@1 with intervals.
            assert images.first.get_attribute("src") == "/plots/held_out.png"
            page.wait_for_load_state("networkidle")
            widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
            assert all(width > 100 for width in widths), widths  # every plot decoded as an image
            page.screenshot(path=ARTIFACTS / "dashboard-iterations.png", full_page=True)

            page.click("text=Candidates")
            assert page.locator("#candidates tbody tr").count() == 11
            page.select_option("select[name=verdict]", "WRONG_ANSWER")
            page.select_option("select[name=sort]", "-score")
            page.click("#apply")
            page.wait_for_url("**/browse?*verdict=WRONG_ANSWER*")
            rows = page.locator("#candidates tbody tr")
            assert rows.count() == 4
            verdicts = page.locator("#candidates tbody td.verdict").all_inner_texts()
            assert verdicts == ["WRONG_ANSWER"] * 4
            # the one that forged its success signal is flagged
            tampered = page.locator("#candidates tbody td.tampered").all_inner_texts()
            assert tampered == ["", "", "", "yes"]  # the lowest score, the first failing id
            ids = [
                int(text)
                for text in page.locator("#candidates tbody td:first-child").all_inner_texts()
            ]
            assert ids == sorted(seeded.failing, reverse=True)  # scores rise with id in the seed
            page.screenshot(path=ARTIFACTS / "dashboard-candidates.png", full_page=True)

            page.click(f"text={seeded.hard_negative}")
            assert page.locator("#verdict").inner_text() == "WRONG_ANSWER"
            assert page.locator(".highlight .k").count() > 0  # Pygments marked up the keywords
            assert "above_lowest_passing" in page.content()
            page.screenshot(path=ARTIFACTS / "dashboard-candidate.png", full_page=True)
        finally:
            browser.close()


def test_dashboard_pages_answer_bad_filters_with_400(pg_session):
    seed_store(pg_session)
    app = create_app(Settings(api_token=None))
    serve_session(app, pg_session)
    with TestClient(app) as client:
        response = client.get(
            "/browse", params={"iteration": "two", "min_score": "nan", "verdict": ""}
        )
        assert response.status_code == 400
        assert "iteration: &#39;two&#39; is not valid" in response.text
        assert "min_score" in response.text
        assert client.get("/browse", params={"cursor": "zzz"}).status_code == 400
        assert client.get("/plots/nope.png").status_code == 404
        assert client.get("/browse/0").status_code == 422
        assert client.get("/browse/99999999").status_code == 404
        assert client.get("/plots/pass1.png").headers["content-type"] == "image/png"


def test_browser_shows_each_candidates_own_score_after_a_newer_reward_model(pg_session):
    seeded = seed_store(pg_session)
    newer = make_model_version(pg_session, name="rm-v3")  # has scored nothing
    app = create_app(Settings(api_token=None))
    serve_session(app, pg_session)
    with TestClient(app) as client:
        response = client.get("/browse", params={"verdict": "OK", "sort": "-score"})
        assert response.status_code == 200
        cells = re.findall(r'<td class="score">(.*?)</td>', response.text)
        # Iteration 1's passing candidates, scored 0.5 to 1.0 by its rm-v1.
        assert cells == [
            f"{0.5 + i / 10:.3f} <small>v{seeded.old_reward}</small>" for i in range(5, -1, -1)
        ]
        assert "the candidate's iteration's reward model" in response.text
        chosen = client.get("/browse", params={"reward_model_version_id": newer.id})
        assert f"Scores from reward model version {newer.id}." in chosen.text
        assert set(re.findall(r'<td class="score">(.*?)</td>', chosen.text)) == {""}
