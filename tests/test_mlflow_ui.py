"""The MLflow UI on a finished tiny grid sweep, read in headless Chromium.

The tests run the tiny grid and start ``mlflow ui`` on 127.0.0.1 against its SQLite store, as
the README does. They then read the pages a user compares runs on. The runs table gets param
and metric columns. The compare page of two points lists their params and metrics and plots
quality, MACs and fairness against pruner, ratio and steps in parallel coordinates.

They need Debian's ``chromium`` and ``chromium-driver`` packages (/usr/bin/chromium and
/usr/bin/chromedriver) and fail without them, unless BIASPRUNE_SKIP_BROWSER=1 skips them.
Screenshots go to $BIASPRUNE_TEST_ARTIFACTS when it is set, else to the test's tmp_path.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import ray
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    ElementNotInteractableException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from biasprune.config import DENSE
from biasprune.results import point_name
from biasprune.sweep import GridConfig, run_grid, to_grid_config

ROOT = Path(__file__).resolve().parents[1]
TEST_CONF = str(ROOT / "tests" / "conf")
ConfigStore.instance().store(name="grid_schema", node=GridConfig)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without network, Chromium otherwise waits on background connections (updates, sync, QUIC).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip
WINDOW = (1700, 1400)
WIDE_WINDOW = (2600, 1400)
TALL_WINDOW = (1700, 2000)
SKIP_ENV = "BIASPRUNE_SKIP_BROWSER"
ARTIFACTS_ENV = "BIASPRUNE_TEST_ARTIFACTS"
WAIT_S = 60  # generous, because the UI renders slowly when 2 CPU cores are busy
SERVER_START_S = 180
PARAM_COLUMNS = ("pruner", "pruning_ratio", "finetune_steps")
METRIC_COLUMNS = ("quality", "fairness_divergence", "macs", "params")
RUN_NAME_COLUMN = "attributes.`Run Name`"

pytestmark = pytest.mark.skipif(os.environ.get(SKIP_ENV) == "1", reason=f"{SKIP_ENV}=1 skips the browser tests")


@dataclass
class Sweep:
    tracking_uri: str
    experiment_id: str
    name: str
    rows: list[dict[str, Any]]


@pytest.fixture(scope="module", autouse=True)
def _chromium_installed() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: install Debian's chromium package "
            f"(apt-get install chromium chromium-driver), or set {SKIP_ENV}=1 to skip the MLflow UI tests",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_cache) -> Sweep:
    """Run the tiny grid of tests/conf/tiny_grid.yaml to the end, in a tracking store of its own."""
    root = tmp_path_factory.mktemp("ui-sweep")
    overrides = [f"output_dir={root / 'out'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"trial.cache_dir={tiny_cache}"]
    with initialize_config_dir(config_dir=TEST_CONF, version_base="1.3"):
        config = to_grid_config(compose(config_name="tiny_grid", overrides=overrides))
    try:
        run_grid(config)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    trials = pd.read_parquet(root / "out" / "trials.parquet")
    assert set(trials["status"]) == {"finished"}
    experiment = mlflow.MlflowClient(config.tracking.uri).get_experiment_by_name(config.tracking.experiment)
    return Sweep(config.tracking.uri, experiment.experiment_id, config.name, trials.to_dict("records"))


@pytest.fixture(scope="module")
def mlflow_ui(sweep, tmp_path_factory) -> Iterator[str]:
    """Start ``mlflow ui`` on a free loopback port with the sweep's store and yield its URL."""
    log_path = tmp_path_factory.mktemp("mlflow-ui") / "mlflow-ui.log"
    port = _free_port()
    command = [
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", sweep.tracking_uri,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with open(log_path, "wb") as log:
        # A session of its own, so that teardown also ends the server's worker processes.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(process, url, log_path)
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[WebDriver]:
    """Start headless Chromium with a fresh profile through Debian's chromedriver."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path_factory.mktemp("chromium-profile")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    service = Service(str(CHROMEDRIVER), log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts_dir(tmp_path) -> Path:
    """Return the screenshot folder: $BIASPRUNE_TEST_ARTIFACTS if set, else the test's tmp_path."""
    folder = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_runs_table_shows_point_columns(browser, mlflow_ui, sweep, artifacts_dir, request, capsys):
    # The table renders only the columns in view, so the window is wide enough for all of them.
    browser.set_window_size(*WIDE_WINDOW)
    try:
        _open_runs_table(browser, mlflow_ui, sweep)
        _add_columns(browser, [*PARAM_COLUMNS, *METRIC_COLUMNS])

        for row in sweep.rows:
            run_id = _row_id(browser, point_name(row))
            params = {name: _cell_text(browser, run_id, f"params.`{name}`") for name in PARAM_COLUMNS}
            assert params["pruner"] == row["pruner"]
            assert float(params["pruning_ratio"]) == row["pruning_ratio"]
            assert int(params["finetune_steps"]) == row["finetune_steps"]
            for name in METRIC_COLUMNS:
                value = float(_cell_text(browser, run_id, f"metrics.`{name}`"))
                # The runs table shows metrics unrounded.
                assert value == pytest.approx(_expected_metric(row, name), rel=1e-9), f"{name} of {point_name(row)}"

        _save_screenshot(browser, artifacts_dir / "mlflow_runs_table.png", request, capsys)
    finally:
        browser.set_window_size(*WINDOW)


def test_compare_page_shows_two_points(browser, mlflow_ui, sweep, artifacts_dir, request, capsys):
    dense = next(row for row in sweep.rows if row["pruner"] == DENSE)
    pruned = min((row for row in sweep.rows if row["pruner"] != DENSE), key=lambda r: (-r["finetune_steps"], r["pruner"]))
    names = [point_name(pruned), point_name(dense)]

    _open_runs_table(browser, mlflow_ui, sweep)
    run_ids = [_row_id(browser, name) for name in names]
    for run_id in run_ids:
        _click(browser, By.CSS_SELECTOR, f".ag-row[row-id='{run_id}'] .ag-selection-checkbox input")
    _click(browser, By.XPATH, "//button[normalize-space()='Compare']")

    _wait(browser, lambda d: "#/compare-runs" in d.current_url, "the compare page did not open")
    for run_id in run_ids:
        assert run_id in browser.current_url
    heading = "//*[self::h1 or self::h2][contains(., 'Comparing 2 Runs')]"
    _wait(browser, _present(By.XPATH, heading), "no heading 'Comparing 2 Runs'")
    _close_assistant(browser)

    # The page has one column per run, in the order of the "Run Name:" row.
    page_names = _table_row(browser, "Run Name:")
    assert sorted(page_names) == sorted(names)
    page_rows = [pruned if name == names[0] else dense for name in page_names]
    assert _table_row(browser, "Run ID:") == [run_ids[names.index(name)] for name in page_names]
    assert _table_row(browser, "pruner") == [row["pruner"] for row in page_rows]
    assert [float(v) for v in _table_row(browser, "pruning_ratio")] == [row["pruning_ratio"] for row in page_rows]
    assert [int(v) for v in _table_row(browser, "finetune_steps")] == [row["finetune_steps"] for row in page_rows]
    for name in METRIC_COLUMNS:
        values = [float(v) for v in _compare_metric(browser, name)]
        expected = [_expected_metric(row, name) for row in page_rows]
        # The compare page rounds, for example to 3 decimals below 10 and to 1 decimal from 100 on.
        assert values == pytest.approx(expected, rel=1e-3, abs=1e-3), name

    _plot_axes(browser, params=PARAM_COLUMNS, metrics=("quality", "macs", "fairness_divergence"))
    labels = _plot_labels(browser)
    assert {*PARAM_COLUMNS, "quality", "macs", "fairness_divergence", DENSE, pruned["pruner"]} <= labels

    browser.set_window_size(*TALL_WINDOW)
    try:
        browser.execute_script("window.scrollTo(0, 0)")
        _save_screenshot(browser, artifacts_dir / "mlflow_compare_runs.png", request, capsys)
    finally:
        browser.set_window_size(*WINDOW)


# --- pages ---------------------------------------------------------------------------------------


def _open_runs_table(driver: WebDriver, url: str, sweep: Sweep) -> None:
    """Open the experiment's runs table and expand the sweep's parent run to list its points."""
    driver.get(f"{url}/#/experiments/{sweep.experiment_id}/runs")
    parent = f"//a[normalize-space()='{sweep.name}']/ancestor::*[@role='row'][1]"
    _wait(driver, _present(By.XPATH, parent), f"the parent run {sweep.name!r} is not listed")
    _close_assistant(driver)
    # The parent's row has a button that shows or hides its child runs. The UI remembers the choice.
    if not driver.find_elements(By.XPATH, _run_row(point_name(sweep.rows[0]))):
        _click(driver, By.XPATH, f"{parent}//*[@col-id={RUN_NAME_COLUMN!r}]//button")
    for row in sweep.rows:
        _row_id(driver, point_name(row))


def _close_assistant(driver: WebDriver) -> None:
    """Close the MLflow Assistant side panel if it is open, because it narrows the page."""
    for button in driver.find_elements(By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"):
        try:
            button.click()
        except (StaleElementReferenceException, ElementClickInterceptedException):
            pass


def _add_columns(driver: WebDriver, names: list[str]) -> None:
    """Show param and metric columns in the runs table through its Columns menu."""
    _click(driver, By.XPATH, "//button[@data-testid='column-selection-dropdown'][contains(., 'Columns')]")
    search = _wait(driver, _present(By.CSS_SELECTOR, "input[placeholder='Search columns']"), "no column search box")
    for name in names:
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(name)
        title = f"//*[@data-testid='column-selector-tree']//span[contains(@class, 'tree-title')][normalize-space()='{name}']"
        _click(driver, By.XPATH, title)
        _wait(driver, _present(By.CSS_SELECTOR, f".ag-header-cell[col-id$='`{name}`']"), f"no column {name!r}")
    search.send_keys(Keys.ESCAPE)


def _row_id(driver: WebDriver, run_name: str) -> str:
    """Return the run id of the runs table's row named `run_name`."""
    element = _wait(driver, _present(By.XPATH, _run_row(run_name)), f"run {run_name!r} is not listed")
    return element.get_attribute("row-id")


def _run_row(run_name: str) -> str:
    return f"//*[@col-id={RUN_NAME_COLUMN!r}]//a[normalize-space()='{run_name}']/ancestor::*[@role='row'][1]"


def _cell_text(driver: WebDriver, run_id: str, column: str) -> str:
    cell = f".ag-row[row-id='{run_id}'] [col-id='{column}']"

    def text(d: WebDriver) -> str | None:
        value = d.find_element(By.CSS_SELECTOR, cell).get_attribute("textContent").strip()
        return value if value and value != "-" else None

    return _wait(driver, text, f"run {run_id} shows no {column}")


def _table_row(driver: WebDriver, header: str) -> list[str]:
    """Return the cells of the compare page's table row headed `header`, one per run."""
    cells = f"//tr[*[1][normalize-space()='{header}']]/*[position() > 1]"

    def texts(d: WebDriver) -> list[str] | None:
        found = [c.get_attribute("textContent").strip() for c in d.find_elements(By.XPATH, cells)]
        return found or None

    return _wait(driver, texts, f"the compare page has no row {header!r}")


# The compare page lists metrics in two virtualised grids (names, values) that render only the
# rows in view. Each call returns the values in the metric's row once its name is rendered,
# else scrolls both grids one step further (from the end back to the top) and returns null.
_METRIC_ROW_JS = """
const [name, step] = arguments;
const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
const names = grids.find(g => g.querySelector('a[href*="#/metric?"]'));
if (!names) return null;
const values = grids[grids.indexOf(names) + 1];
const cells = g => [...g.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > *')];
const cell = cells(names).find(c => c.textContent.trim() === name);
if (cell) {
  const row = cells(values).filter(c => c.style.top === cell.style.top);
  row.sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left));
  return row.length ? row.map(c => c.textContent.trim()) : null;
}
const atEnd = names.scrollTop + names.clientHeight >= names.scrollHeight - 1;
names.scrollTop = atEnd ? 0 : names.scrollTop + step;
values.scrollTop = names.scrollTop;
return null;
"""


def _compare_metric(driver: WebDriver, name: str) -> list[str]:
    return _wait(driver, lambda d: d.execute_script(_METRIC_ROW_JS, name, 250), f"the compare page shows no metric {name!r}")


def _plot_axes(driver: WebDriver, params: tuple[str, ...], metrics: tuple[str, ...]) -> None:
    """Choose the params and metrics of the parallel coordinates plot through its two selects."""
    _click(driver, By.XPATH, "//button[normalize-space()='Clear All']")
    for label, names in (("Parameters:", params), ("Metrics:", metrics)):
        select = f"//div[normalize-space(text())='{label}']/following-sibling::div[contains(@class, 'select')][1]"
        for name in names:
            _click(driver, By.XPATH, f"{select}//*[contains(@class, 'select-selector')]")
            driver.find_element(By.XPATH, f"{select}//input").send_keys(name)
            option = f"//div[contains(@class, 'select-item-option')][@title='{name}' or normalize-space()='{name}']"
            _wait(driver, lambda d: _click_displayed(d, option), f"no option {name!r} for {label}")
            chosen = f"{select}//span[contains(@class, 'selection-item-content')][normalize-space()='{name}']"
            _wait(driver, _present(By.XPATH, chosen), f"{name!r} was not chosen for {label}")
            driver.find_element(By.XPATH, f"{select}//input").send_keys(Keys.ESCAPE)


def _plot_labels(driver: WebDriver) -> set[str]:
    """Return the texts of the plot's SVG (axis names and tick labels) once every axis is drawn."""

    def labels(d: WebDriver) -> set[str] | None:
        found = set(d.execute_script("return [...document.querySelectorAll('svg text')].map(t => t.textContent.trim())"))
        return found if {"quality", "macs", "fairness_divergence"} <= found else None

    return _wait(driver, labels, "the parallel coordinates plot does not show quality, macs and fairness_divergence")


def _save_screenshot(driver: WebDriver, path: Path, request, capsys) -> None:
    _close_assistant(driver)
    assert driver.save_screenshot(str(path)), f"the screenshot {path} could not be written"
    request.node.user_properties.append(("screenshot", str(path)))
    with capsys.disabled():
        print(f"\nscreenshot: {path}")


# --- values --------------------------------------------------------------------------------------


def _expected_metric(row: dict[str, Any], name: str) -> float:
    """Return the row's value of a metric column, where ``quality`` is the metric that ``quality_metric`` names."""
    return row[row["quality_metric"]] if name == "quality" else row[name]


# --- waiting and clicking --------------------------------------------------------------------------


def _wait(driver: WebDriver, condition: Callable[[WebDriver], Any], message: str) -> Any:
    waiter = WebDriverWait(
        driver, WAIT_S, poll_frequency=0.25, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    )
    try:
        return waiter.until(condition)
    except TimeoutException:
        pytest.fail(f"{message} within {WAIT_S} s (page {driver.current_url})")


def _present(by: str, selector: str) -> Callable[[WebDriver], Any]:
    return lambda d: d.find_element(by, selector)


def _click(driver: WebDriver, by: str, selector: str) -> None:
    """Click the element once it exists and nothing covers it, finding it again while React re-renders it."""

    def clicked(d: WebDriver) -> bool:
        try:
            d.find_element(by, selector).click()
        except (ElementClickInterceptedException, ElementNotInteractableException):
            return False
        return True

    _wait(driver, clicked, f"could not click {selector}")


def _click_displayed(driver: WebDriver, selector: str) -> bool:
    visible = [e for e in driver.find_elements(By.XPATH, selector) if e.is_displayed()]
    if not visible:
        return False
    visible[0].click()
    return True


# --- the server ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_healthy(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"mlflow ui failed to start (exit code {process.returncode}). Its log ends:\n{log_path.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(
        f"mlflow ui on {url} timed out: no response within {SERVER_START_S} s; raise SERVER_START_S on a slow "
        f"machine. Its log ends:\n{log_path.read_text()[-3000:]}"
    )


def _stop(process: subprocess.Popen) -> None:
    """Stop the server: SIGTERM to its process group, SIGKILL after 15 s, then SIGKILL to any worker left."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait(15)
    _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
