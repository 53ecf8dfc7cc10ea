"""The training dashboard (``/dashboard``) in headless Chromium, against real server processes.

``test_the_curves_follow_a_live_sweep`` runs ``examples/momentum_sweep.py`` (three momenta, its
workers reporting their training loss with every push) against a server while the page is open:
each model's curve appears and grows as the workers push, the three overlay (one colour each,
a legend, a checkbox per model), and once the sweep is done every number the page shows is the
API's (the steps of ``GET /v1/models``, the last point's loss and lr, the workers' staleness).
``test_the_page_asks_for_an_api_key`` runs a server with API keys: the page and its files are
served without one, the page asks for a key, shows the models that key may read once it is
entered, keeps it for the tab, and says which model a key may not read.

With ``MOMENTUM_SCREENSHOT=docs/img/dashboard.png`` the first test saves the page (1280x800, log
scale) there while the sweep's last model trains: that is how docs/img/dashboard.png is made.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import momentum_client as mc
import numpy as np
import pytest
from momentum_service.auth import hash_key

from .helpers import ROOT, ServerProcess

sync_api = pytest.importorskip("playwright.sync_api", reason="the dashboard tests drive Chromium through playwright")

CHROMIUM = os.environ.get("MOMENTUM_CHROMIUM", "/usr/bin/chromium")  # Debian's, see scripts/install
SCREENSHOT = os.environ.get("MOMENTUM_SCREENSHOT")
VIEWPORT = {"width": 1280, "height": 800}

MOMENTA = ("0", "0.5", "0.9")
STEPS = 3000  # per model: about 4 s of pushes (1,000 took 1.5 s), so the page (polling every second) sees each grow
PREFIX = "sweep"

ADMIN, READER = "msk_dashboard-test-admin", "msk_dashboard-test-reader"
KEY_LINES = f"{hash_key(ADMIN)} admin:*;{hash_key(READER)} read:open-*"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/install installs Debian's)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page in a fresh context (its own sessionStorage); fails the test on a script error."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], errors


def model_name(momentum: str) -> str:
    return f"{PREFIX}-m{float(momentum):g}"  # as examples/momentum_sweep.py names its models


def read_live(page: Any, names: list[str]) -> dict[str, dict[str, float]]:
    """What the page shows now for each model: the curve's point count, steps/s, steps."""
    return page.evaluate(  # type: ignore[no-any-return]
        """names => Object.fromEntries(names.map(n => {
            const curve = document.querySelector(`#chart path[data-model="${n}"]`);
            const rate = document.querySelector(`[data-testid="rate-${n}"]`);
            const steps = document.querySelector(`[data-testid="steps-${n}"]`);
            return [n, {
                points: curve ? Number(curve.dataset.points) : 0,
                rate: rate ? Number(rate.dataset.value) : 0,
                steps: steps && steps.dataset.value ? Number(steps.dataset.value) : 0,
            }];
        }))""",
        names,
    )


def shown(page: Any, test_id: str, attribute: str = "data-value") -> str:
    value = page.get_by_test_id(test_id).get_attribute(attribute)
    assert value is not None, test_id
    return str(value)


def curves(page: Any) -> list[str]:
    return [str(m) for m in page.eval_on_selector_all("#chart path[data-model]", "ps => ps.map(p => p.dataset.model)")]


def test_the_curves_follow_a_live_sweep(page: Any, tmp_path: Path) -> None:
    server = ServerProcess().start()
    names = [model_name(m) for m in MOMENTA]
    log = tmp_path / "sweep.log"
    sweep: subprocess.Popen[bytes] | None = None
    try:
        response = page.goto(server.url + "/dashboard")
        assert response is not None and response.status == 200
        # The sweep starts once the page has read the API (its first poll): a model trained before the page
        # was up would show only its whole curve, however fast the page's own polls are.
        page.wait_for_function("document.getElementById('status').dataset.state === 'ok'", timeout=30_000)
        with log.open("w") as out:
            sweep = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "examples" / "momentum_sweep.py"),
                    *("--url", server.url, "--prefix", PREFIX, "--momenta", *MOMENTA),
                    *("--steps", str(STEPS), "--workers", "2", "--out-dir", str(tmp_path)),
                    "--keep-models",
                    "--no-progress",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        screenshot = SCREENSHOT
        if screenshot:
            page.get_by_test_id("log-y").check()  # the picture: log scale, while the last model trains

        # While the sweep runs: every model's curve appears and grows, at a rate the page measures.
        seen: dict[str, set[int]] = {n: set() for n in names}
        rates: dict[str, float] = dict.fromkeys(names, 0.0)
        deadline = time.monotonic() + 75
        while sweep.poll() is None:
            assert time.monotonic() < deadline, "the sweep did not finish in 75 s:\n" + log.read_text()
            for name, now in read_live(page, names).items():
                if now["points"]:
                    seen[name].add(int(now["points"]))
                rates[name] = max(rates[name], now["rate"])
            if screenshot and max(seen[names[-1]], default=0) >= 0.6 * STEPS:
                page.screenshot(path=str(ROOT / screenshot))
                screenshot = None
            time.sleep(0.2)
        assert sweep.returncode == 0, log.read_text()
        print("point counts the page showed while the sweep ran:", {n: sorted(seen[n]) for n in names})
        for name in names:
            assert len(seen[name]) >= 2, f"{name}'s curve did not grow while its workers pushed: {seen[name]}"
            assert min(seen[name]) < STEPS, seen[name]
            assert rates[name] > 0, name

        # The sweep is done: once the page has polled again, what it shows is what the API says.
        with httpx.Client(base_url=server.url) as http:
            listing = {m["name"]: m for m in http.get("/v1/models", params={"limit": 1000}).json()["models"]}
            points = {n: http.get(f"/v1/models/{n}/metrics", params={"limit": 10000}).json()["points"] for n in names}
        assert sorted(listing) == names
        expected = {
            n: {"steps": listing[n]["steps"], "points": sum("loss" in p["metrics"] for p in points[n])} for n in names
        }
        assert all(e == {"steps": STEPS, "points": STEPS} for e in expected.values()), expected  # a loss per push
        page.wait_for_function(
            """expected => Object.entries(expected).every(([n, e]) => {
                const curve = document.querySelector(`#chart path[data-model="${n}"]`);
                const steps = document.querySelector(`[data-testid="steps-${n}"]`);
                return curve && Number(curve.dataset.points) === e.points
                    && steps && Number(steps.textContent) === e.steps;
            })""",
            arg=expected,
            timeout=5000,
        )
        for name in names:
            row = page.get_by_test_id(f"model-row-{name}")
            assert row.is_visible()
            last = points[name][-1]
            assert page.get_by_test_id(f"steps-{name}").inner_text() == str(listing[name]["steps"])
            assert int(shown(page, f"curve-{name}", "data-points")) == expected[name]["points"]
            assert float(shown(page, f"last-loss-{name}")) == last["metrics"]["loss"]  # exactly: JS prints doubles
            assert float(shown(page, f"lr-last-{name}")) == last["lr"]
            assert int(shown(page, f"lr-{name}", "data-points")) == len(points[name])
            assert page.get_by_test_id(f"rule-{name}").inner_text() == listing[name]["rule"]
            assert page.get_by_test_id(f"mode-{name}").inner_text() == listing[name]["mode"] == "async"
            # The sweep's async workers push without a worker id: the page shows the latest staleness.
            workers = page.get_by_test_id(f"workers-{name}").locator("[data-worker]")
            assert workers.evaluate_all("ws => ws.map(w => [w.dataset.worker, w.dataset.staleness])") == [
                ["anonymous", str(last["staleness"])]
            ]
            assert float(shown(page, f"rate-{name}")) >= 0

        # Overlay: a curve per model, one colour each, and a legend; a checkbox hides and shows one.
        assert sorted(curves(page)) == names
        colours = page.eval_on_selector_all("#chart path[data-model]", "ps => ps.map(p => p.getAttribute('stroke'))")
        assert len(set(colours)) == len(names), colours
        assert (
            sorted(page.eval_on_selector_all("[data-testid^=legend-]", "ls => ls.map(l => l.dataset.model)")) == names
        )
        assert page.get_by_test_id("metric-select").input_value() == "loss"
        hidden = names[1]
        page.get_by_test_id(f"toggle-{hidden}").uncheck()
        assert sorted(curves(page)) == [n for n in names if n != hidden]
        assert page.get_by_test_id(f"legend-{hidden}").count() == 0
        assert f"models={names[0]},{names[2]}" in page.url  # the view is in the URL's fragment
        page.get_by_test_id(f"toggle-{hidden}").check()
        assert sorted(curves(page)) == names
        page.get_by_test_id("log-y").check()
        assert sorted(curves(page)) == names
        assert "log=1" in page.url
    finally:
        if sweep is not None and sweep.poll() is None:
            sweep.kill()
            sweep.wait(10)
        server.stop()


def test_the_page_asks_for_an_api_key(page: Any) -> None:
    server = ServerProcess(env={"MOMENTUM_API_KEYS": KEY_LINES}).start()
    try:
        with mc.Client(server.url, api_key=ADMIN) as admin:
            for model in ("open-a", "secret-b"):
                admin.create_model(model, lr=0.1, momentum=0.9)
                admin.init_params(model, {"w": np.zeros(3, np.float32)})
                for i in range(6):  # two workers, worker 1 one step behind
                    base = i if i % 2 == 0 else i - 1
                    admin.step(
                        model,
                        {"w": np.full(3, 0.5, np.float32)},
                        worker_id=i % 2,
                        base_step=base,
                        metrics={"loss": 1.0 / (i + 3), "accuracy": i / 7},
                    )

        with httpx.Client(base_url=server.url) as http:
            # The page and its files hold no data: no key needed. The API does need one.
            for path, kind in [("", "text/html"), ("/app.js", "text/javascript"), ("/style.css", "text/css")]:
                r = http.get("/dashboard" + path)
                assert r.status_code == 200, (path, r.text)
                assert r.headers["content-type"].startswith(kind)
                assert r.headers["cache-control"] == "no-cache"
            assert http.get("/dashboard/secrets.txt").status_code == 404
            assert http.get("/dashboard/..%2fopenapi.json").status_code == 401  # only the dashboard's own files
            assert http.get("/v1/models").status_code == 401
            reader = {"Authorization": f"Bearer {READER}"}
            listing = http.get("/v1/models", headers=reader).json()["models"]
            points = http.get("/v1/models/open-a/metrics", headers=reader).json()["points"]
            assert http.get("/v1/models/secret-b/metrics", headers=reader).status_code == 403
        assert [m["name"] for m in listing] == ["open-a"]

        response = page.goto(server.url + "/dashboard")
        assert response is not None and response.status == 200
        form = page.get_by_test_id("key-form")
        form.wait_for()
        page.get_by_label("API key").fill("msk_not-a-key")
        page.get_by_test_id("key-submit").click()
        sync_api.expect(page.get_by_test_id("key-message")).to_contain_text("refused")
        assert form.is_visible()
        page.get_by_label("API key").fill(READER)
        page.get_by_test_id("key-submit").click()

        page.get_by_test_id("model-row-open-a").wait_for()
        sync_api.expect(page.get_by_test_id("curve-open-a")).to_have_attribute("data-points", str(len(points)))
        assert not form.is_visible()
        assert page.get_by_test_id("model-row-secret-b").count() == 0  # the list has only what the key reads
        assert page.get_by_test_id("steps-open-a").inner_text() == str(listing[0]["steps"]) == "6"
        assert float(shown(page, "last-loss-open-a")) == points[-1]["metrics"]["loss"]
        workers = page.get_by_test_id("workers-open-a").locator("[data-worker]")
        latest = {str(p["worker"]): str(p["staleness"]) for p in points}
        assert dict(workers.evaluate_all("ws => ws.map(w => [w.dataset.worker, w.dataset.staleness])")) == latest
        assert latest == {"0": "0", "1": "1"}
        page.get_by_test_id("metric-select").select_option("accuracy")  # any metric the points carry
        assert float(shown(page, "last-accuracy-open-a")) == points[-1]["metrics"]["accuracy"]

        page.reload()  # the key is kept for the tab
        page.get_by_test_id("model-row-open-a").wait_for()
        assert not form.is_visible()

        # A model the key may not read, named in the URL: the page says so.
        page.goto(server.url + "/dashboard#models=open-a,secret-b")
        sync_api.expect(page.get_by_test_id("forbidden-secret-b")).to_contain_text('may not read model "secret-b"')
        sync_api.expect(page.get_by_test_id("alert")).to_contain_text("secret-b")
        assert curves(page) == ["open-a"]
    finally:
        server.stop()
