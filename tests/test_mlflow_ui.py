"""What a person sees in the MLflow UI after `dvc repro`: a real `mlflow server` on loopback over the pipeline's own
store, opened in headless Chromium (Debian's `chromium`, driven by Playwright; no browser download).

The registered model `kiln` shows each version with its aliases (`champion`, `challenger`), the challenger version
shows the evaluate stage's `deployable` run as its source, and the runs comparison of that evaluate run's `baseline`
and `deployable` child runs shows both names and their metrics in the right columns. Full-page screenshots go to
`test-artifacts/mlflow-ui/` (`KILN_TEST_ARTIFACTS` replaces `test-artifacts`), taken before the assertions so a
failure leaves a picture of what the page showed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from PIL import Image
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from tests.conftest import BIN, REPO, TINY_PARAMS, free_port, stop

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make test` installs it)"),
]

ARTIFACTS = Path(os.environ.get("KILN_TEST_ARTIFACTS", REPO / "test-artifacts")) / "mlflow-ui"
MODEL = TINY_PARAMS["tracking"]["registered_model"]
EXPERIMENT = TINY_PARAMS["tracking"]["experiment"]
METRICS = ("test_accuracy", "test_macro_f1", "test_ece", "latency_batched_p50_ms", "model_size_bytes")
WAIT_MS = 60_000  # the single-page app renders after its API calls; generous for a loaded 2-core CI machine
WIDTH = 1440


@pytest.fixture(scope="module")
def store(reproduced: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{reproduced / 'mlflow.db'}")


@pytest.fixture(scope="module")
def evaluate_runs(store: MlflowClient) -> dict[str, Run]:
    """The newest evaluate run's child runs by name (`baseline`, `deployable`), as the evaluate stage logged them."""
    experiment_id = store.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = store.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)
    parents = [r for r in runs if r.info.run_name == "evaluate" and "mlflow.parentRunId" not in r.data.tags]
    assert parents, f"no evaluate run in experiment {EXPERIMENT}"
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"baseline", "deployable"} <= set(children), (
        f"evaluate run {parent.info.run_id} has child runs {sorted(children)}, not baseline and deployable")
    return children


@pytest.fixture(scope="module")
def server(reproduced: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over the pipeline's store and artifacts; only this server is stopped after."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this module's screenshots only, none left from an earlier session
    ARTIFACTS.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{reproduced / 'mlflow.db'}",
               "--artifacts-destination", str(reproduced / "mlartifacts")]
    # No background job runner (its huey consumers only serve GenAI jobs): less CPU, fewer processes to stop.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = ARTIFACTS / "mlflow-server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=tmp_path_factory.mktemp("mlflow-server"), env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"mlflow server exited {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.read().strip() == b"OK":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not answer /health in 120 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": WIDTH, "height": 900}, locale="en-US", timezone_id="UTC")
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    yield page
    context.close()


# The viewport height at which no scrolling pane of the page has anything left to scroll (virtualised grids keep
# their height whatever the viewport's).
FULL_HEIGHT = """() => Math.max(window.innerHeight, ...Array.from(document.querySelectorAll('*'), e => {
    const overflow = getComputedStyle(e).overflowY;
    const pane = (overflow === 'auto' || overflow === 'scroll') && e.clientHeight > 0
        && !e.classList.contains('ReactVirtualized__Grid');
    return pane ? window.innerHeight + e.scrollHeight - e.clientHeight : 0;
}))"""


def screenshot(page: Page, name: str) -> Path:
    """A full-page PNG of what the page shows now. The UI scrolls inside its own panes, so the viewport first grows
    to the tallest pane's content, and the MLflow Assistant side panel is closed so the page gets the width."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count() and close.first.is_visible():
        close.first.click()
        expect(close).to_have_count(0)
    page.set_viewport_size({"width": WIDTH, "height": min(page.evaluate(FULL_HEIGHT), 8000)})
    page.wait_for_timeout(300)  # one layout pass after the resize: charts and virtualised grids re-measure
    path = ARTIFACTS / f"{name}.png"
    path.unlink(missing_ok=True)
    page.screenshot(path=path, full_page=True)
    return path


def assert_real_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 20_000, path
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= WIDTH and image.height >= 900, (image.format, image.size)
        low, high = image.convert("L").getextrema()
        assert high - low > 100, f"{path} is nearly blank"
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50, f"{path} has almost no content"


def alias_tags(element: Locator, alias: str | None = None) -> Locator:
    """The alias tags ("@ champion") in `element`; version tags are tags too, without the @."""
    tags = element.get_by_role("status", name=alias, exact=True) if alias else element.get_by_role("status")
    return tags.filter(has_text=re.compile(r"^@"))


def aliases_shown(element: Locator) -> set[str]:
    return {re.sub(r"^@\s*", "", text).strip() for text in alias_tags(element).all_inner_texts()}


def shown_close_to(text: str, value: float) -> bool:
    """The UI rounds metrics (3 decimals below 10, 1 decimal from 100 up)."""
    return math.isclose(float(text), value, rel_tol=1e-3, abs_tol=5e-4 if abs(value) < 10 else 0.05)


def test_registered_model_page_shows_versions_and_aliases(server: str, page: Page, store: MlflowClient,
                                                          evaluate_runs: dict[str, Run]) -> None:
    aliases = store.get_registered_model(MODEL).aliases  # alias -> version
    assert {"champion", "challenger"} <= set(aliases), aliases
    versions = sorted(int(v.version) for v in store.search_model_versions(f"name = '{MODEL}'"))
    page.goto(f"{server}/#/models/{MODEL}")
    rows = {v: page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {v}", exact=True))
            for v in versions}
    for alias, version in aliases.items():
        expect(alias_tags(rows[int(version)], alias)).to_be_visible()
    shot = screenshot(page, "registered-model")
    expect(page.get_by_role("heading", name=MODEL, exact=True)).to_be_visible()
    for version, row in rows.items():
        expect(row).to_have_count(1)
        expected = {alias for alias, v in aliases.items() if int(v) == version}
        assert aliases_shown(row) == expected, f"version {version} shows {aliases_shown(row)}, expected {expected}"
    assert_real_png(shot)

    challenger = aliases["challenger"]
    deployable = evaluate_runs["deployable"]
    assert store.get_model_version(MODEL, challenger).run_id == deployable.info.run_id
    page.goto(f"{server}/#/models/{MODEL}/versions/{challenger}")
    source = page.get_by_role("link", name="deployable", exact=True)
    expect(source).to_have_attribute("href", re.compile(re.escape(deployable.info.run_id)))
    expect(alias_tags(page.locator("body"), "challenger")).to_be_visible()
    shot = screenshot(page, f"model-version-{challenger}")
    expect(page.get_by_role("heading", name=f"Version {challenger}", exact=True)).to_be_visible()
    shown = aliases_shown(page.locator("body"))
    assert shown == {alias for alias, v in aliases.items() if v == challenger}, shown
    assert_real_png(shot)


# The comparison's metrics are two virtualised grids 300 px high, the names and the values; scrolling the values
# scrolls the names to where the values were one scroll event before, so both are scrolled here, until the row of
# metric `key` is the top one. False if there is no such row.
SCROLL_TO_METRIC = """async (key) => {
    const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
    const names = grids.find(grid => grid.querySelector('a[title="Plot chart"]'));
    const top = names.getBoundingClientRect().top;
    const values = grids.find(grid => grid !== names && Math.abs(grid.getBoundingClientRect().top - top) < 1);
    const label = () => [...names.querySelectorAll('a[title="Plot chart"]')].find(a => a.textContent.trim() === key);
    const scroll = async (offset) => {
        values.scrollTop = offset;
        names.scrollTop = offset;
        await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
    };
    for (let offset = 0; offset <= values.scrollHeight; offset += values.clientHeight / 2) {
        if (label()) {
            await scroll(parseFloat(label().parentElement.style.top));
            return true;
        }
        await scroll(offset);
    }
    return false;
}"""


def metric_row(page: Page, key: str) -> list[str]:
    """The values the comparison shows for metric `key`, left to right: a value belongs to the metric whose label is
    on the same line."""
    assert page.evaluate(SCROLL_TO_METRIC, key), f"the comparison has no row for {key}"
    label = page.locator('a[title="Plot chart"]', has_text=re.compile(rf"^{re.escape(key)}$"))
    expect(label).to_be_visible()
    box = label.bounding_box()
    middle = box["y"] + box["height"] / 2
    cells = []
    for cell in page.locator(".ReactVirtualized__Grid__innerScrollContainer > div").all():
        where = cell.bounding_box()
        if where and where["x"] >= box["x"] + box["width"] and where["y"] <= middle <= where["y"] + where["height"]:
            cells.append((where["x"], cell.inner_text().strip()))
    return [text for _, text in sorted(cells)]


def test_compare_page_shows_baseline_and_deployable_metrics(server: str, page: Page,
                                                            evaluate_runs: dict[str, Run]) -> None:
    runs = [evaluate_runs["baseline"], evaluate_runs["deployable"]]
    for key in METRICS:
        assert all(key in r.data.metrics for r in runs), f"{key} is not logged by both runs"
    assert runs[0].data.tags.get("kiln.variant") == "fp32"
    assert runs[1].data.tags.get("kiln.variant"), "the deployable run names its variant (fp32 when none beat it)"
    ids = json.dumps([r.info.run_id for r in runs], separators=(",", ":"))
    experiments = json.dumps(sorted({r.info.experiment_id for r in runs}), separators=(",", ":"))
    page.goto(f"{server}/#/compare-runs?runs={ids}&experiments={experiments}")
    expect(page.get_by_text("Comparing 2 Runs", exact=False)).to_be_visible()
    id_row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name="Run ID:"))
    name_row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name="Run Name:"))
    expect(name_row.get_by_role("cell")).to_have_count(2)
    expect(page.locator('a[title="Plot chart"]').first).to_be_visible()
    assert page.evaluate(SCROLL_TO_METRIC, "test_accuracy"), "the comparison has no row for test_accuracy"
    shot = screenshot(page, "compare-baseline-deployable")

    columns = [link.inner_text().strip() for link in id_row.get_by_role("link").all()]
    assert sorted(columns) == sorted(r.info.run_id for r in runs), columns
    by_id = {r.info.run_id: r for r in runs}
    names = [cell.inner_text().strip() for cell in name_row.get_by_role("cell").all()]
    assert names == [by_id[i].info.run_name for i in columns], (names, columns)
    for key in METRICS:
        shown = metric_row(page, key)
        expected = [by_id[i].data.metrics[key] for i in columns]
        assert len(shown) == len(expected) and all(map(shown_close_to, shown, expected)), (key, shown, expected)
    variant_row = page.get_by_role("row").filter(has=page.get_by_text("kiln.variant", exact=True))
    expect(variant_row).to_contain_text(runs[1].data.tags["kiln.variant"])
    assert_real_png(shot)
