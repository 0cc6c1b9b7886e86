"""Notebook 02 as a learner uses it: JupyterLab in headless Chromium, Run All, move two widgets, re-run the cells below.

The test starts its own JupyterLab (localhost, a random port and token) on a copy of notebook 02, so autosave
never writes outputs into the repository. It drives the page with Selenium like a person would (menus, keys
on the slider handles), then asks the kernel, through a cell appended at the end, which learning rate and rank
the Trainer and the adapter really used. A screenshot of the widget panel goes to outputs/browser/ (a CI artifact).

Skipped, with the reason, only when Chromium, its driver or Selenium is missing (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = REPO / "outputs" / "browser"
NOTEBOOK = "02_lora_fp16.ipynb"

pytestmark = pytest.mark.browser
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("Chromium or chromedriver is missing: apt-get install -y chromium chromium-driver", allow_module_level=True)

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the repository's notebooks/ beside data/ (outputs/ fresh); yields its URL and token."""
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    shutil.copy(REPO / "notebooks" / NOTEBOOK, root / "notebooks" / NOTEBOOK)
    (root / "data").symlink_to(REPO / "data")
    news = root / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no news toast over the page
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "JUPYTER_CONFIG_DIR": str(root / ".jupyter"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "QWEN_HELPERS_CACHE": os.environ.get("QWEN_HELPERS_CACHE", str(REPO / "outputs" / "cache"))}
    log = open(root / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
         *(["--allow-root"] if os.geteuid() == 0 else []), f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={root / '.settings'}", f"--LabApp.workspaces_dir={root / '.workspaces'}"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.terminate()
        pytest.fail(f"JupyterLab did not start within 60 s; see {root / 'jupyterlab.log'}:\n{(root / 'jupyterlab.log').read_text()[-2000:]}")
    yield url, token, root
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium at 1280 x 900, as root in CI: no sandbox, no GPU, no network side traffic, a fresh profile."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_window_size(1280, 900)
    yield driver
    driver.quit()


def accept_dialogs(driver) -> list[str]:
    """Accept any JupyterLab dialog (e.g. the kernel choice on first open) with its default button; return their texts."""
    texts = []
    for dialog in driver.find_elements(By.CSS_SELECTOR, "dialog.jp-Dialog"):
        texts.append(dialog.text)
        buttons = dialog.find_elements(By.CSS_SELECTOR, "button.jp-mod-accept")
        if buttons:
            buttons[-1].click()
            time.sleep(1)
    return texts


def click_menu(driver, menu: str, item: str) -> None:
    """Open a top menu of JupyterLab and click one of its items, as a person would."""
    driver.find_element(By.XPATH, f"//div[@id='jp-MainMenu']//li[contains(@class,'lm-MenuBar-item')][.//div[normalize-space(text())='{menu}']]").click()
    WebDriverWait(driver, 10).until(
        lambda d: d.find_element(By.XPATH, f"//ul[contains(@class,'lm-Menu-content')]/li[.//div[normalize-space(text())='{item}']]")
    ).click()


def wait_until_idle(driver, timeout: float) -> None:
    """Wait until no cell is queued or running ([*]) and the kernel reports idle, a few polls in a row."""
    deadline, calm = time.time() + timeout, 0
    while time.time() < deadline:
        busy = driver.execute_script(
            "return [...document.querySelectorAll('.jp-InputPrompt')].some(p => p.textContent.includes('*'))"
            " || !!document.querySelector('.jp-Notebook-ExecutionIndicator[data-status=\"busy\"]');"
        )
        calm = 0 if busy else calm + 1
        if calm >= 3:
            return
        time.sleep(1)
    raise AssertionError(f"the notebook was still running after {timeout:.0f} s")


def cell_index(driver, text: str) -> int:
    """Index of the first cell whose source contains ``text``."""
    sources = driver.execute_script("return [...document.querySelectorAll('.jp-Notebook .jp-Cell')].map(c => c.textContent);")
    return next(index for index, source in enumerate(sources) if text in source)


def select_cell(driver, index: int) -> None:
    """Click a cell's prompt area: the cell becomes active, in command mode."""
    cell = driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[index]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", cell)
    cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()


def slider_handle(driver, description: str):
    """The draggable handle of the slider labelled ``description`` in the panels."""
    return driver.find_element(
        By.XPATH, f"//div[contains(@class,'widget-slider')][.//label[normalize-space(text())='{description}']]//div[contains(@class,'noUi-handle')]"
    )


def slider_readout(driver, description: str) -> str:
    return driver.find_element(
        By.XPATH, f"//div[contains(@class,'widget-slider')][.//label[normalize-space(text())='{description}']]//div[contains(@class,'widget-readout')]"
    ).text


def move_slider(driver, description: str, key: str) -> str:
    """Focus a slider's handle and press an arrow key once (one stop); return the new readout."""
    handle = slider_handle(driver, description)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
    before = slider_readout(driver, description)
    handle.click()
    handle.send_keys(key)
    WebDriverWait(driver, 10).until(lambda d: slider_readout(d, description) != before)
    return slider_readout(driver, description)


def toolbar_button(driver, command: str):
    """A button of the notebook's toolbar, found by the JupyterLab command it runs."""
    return driver.find_element(By.CSS_SELECTOR, f".jp-NotebookPanel-toolbar [data-command='{command}']")


def run_probe(driver, root: Path) -> dict:
    """Add a cell at the end with the toolbar's +, type `%run -i probe.py` into it, run it, and return the JSON it printed.

    The probe reads the notebook's own variables (``-i``); a file keeps brackets and quotes out of the typed text.
    """
    (root / "notebooks" / "probe.py").write_text(PROBE, encoding="utf-8")
    select_cell(driver, len(driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")) - 1)
    toolbar_button(driver, "notebook:insert-cell-below").click()
    time.sleep(1)
    cell = driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[-1]
    editor = cell.find_element(By.CSS_SELECTOR, ".cm-content")
    editor.click()
    editor.send_keys("%run -i probe.py")
    toolbar_button(driver, "notebook:run-cell-and-select-next").click()
    WebDriverWait(driver, 300).until(lambda d: "PROBE " in cell.text or "Error" in cell.text)
    line = next((line for line in cell.text.splitlines() if line.startswith("PROBE ")), None)
    assert line, f"the probe cell printed no PROBE line:\n{cell.text[-2000:]}"
    return json.loads(line[len("PROBE "):])


PROBE = """import json
print("PROBE " + json.dumps({"learning_rate": trainer.args.learning_rate, "initial_lr": trainer.optimizer.param_groups[0]["initial_lr"],
                             "r": model.peft_config["default"].r, "max_steps": trainer.args.max_steps, "steps_done": trainer.state.global_step,
                             "exact": int(sum(exact)), "reload_difference": difference}))
"""


def test_notebook_02_in_jupyterlab_widgets_apply_on_rerun(lab, browser):
    try:
        run_notebook_02_like_a_learner(*lab, browser)
    except BaseException:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "failure.png"))
        dialogs = [dialog.text for dialog in browser.find_elements(By.CSS_SELECTOR, "dialog.jp-Dialog")]
        print(f"screenshot of the failure: {SCREENSHOTS / 'failure.png'}; open dialogs: {dialogs}")
        raise


def run_notebook_02_like_a_learner(url, token, root, browser):
    started = time.time()
    browser.get(f"{url}/lab/tree/notebooks/{NOTEBOOK}?token={token}")
    WebDriverWait(browser, 90).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"))
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script("const s = document.querySelector('.jp-Notebook-ExecutionIndicator'); return !s || s.dataset.status === 'idle';")
    )
    time.sleep(2)
    print("dialogs on opening:", accept_dialogs(browser))
    try:
        click_menu(browser, "Run", "Run All Cells")
    except WebDriverException as error:
        pytest.fail(f"could not click Run > Run All Cells in JupyterLab: {error.msg}")
    wait_until_idle(browser, 900)  # about a minute and a half on an idle 2-core machine
    errors = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] .jp-RenderedText pre")
    tracebacks = [element.text for element in errors if "Traceback" in element.text]
    assert not tracebacks, f"a cell failed on Run All: {tracebacks[0][:1500]}"

    first = run_probe(browser, root)
    assert first["learning_rate"] == pytest.approx(1e-2) and first["r"] == 16, first
    assert first["steps_done"] == first["max_steps"] == 30, first
    assert first["exact"] >= 2 and first["reload_difference"] < 1e-4, first  # the last cells ran too

    # The panel fits a 1280 px window with the file browser open: it wraps, it never scrolls sideways.
    panel_row = browser.find_element(By.XPATH, "//div[contains(@class,'widget-box')][.//label[normalize-space(text())='learning_rate']][.//label[normalize-space(text())='lora_r']]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", panel_row)
    scroll, visible = browser.execute_script("return [arguments[0].scrollWidth, arguments[0].clientWidth];", panel_row)
    assert scroll <= visible + 1, f"the widget panels scroll sideways ({scroll} px of content in {visible} px)"
    assert slider_readout(browser, "learning_rate") == "0.01" and slider_readout(browser, "lora_r") == "16", "showing the panel changed a value"

    new_rate = move_slider(browser, "learning_rate", Keys.ARROW_LEFT)  # one stop down: 5e-03
    new_rank = move_slider(browser, "lora_r", Keys.ARROW_RIGHT)  # one stop up: 32
    assert (new_rate, new_rank) == ("5e-03", "32"), (new_rate, new_rank)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    panel_row.screenshot(str(SCREENSHOTS / "notebook_02_panel.png"))
    browser.save_screenshot(str(SCREENSHOTS / "notebook_02_window.png"))

    select_cell(browser, cell_index(browser, "training_panel = config_panel(") + 1)
    click_menu(browser, "Run", "Run Selected Cell and All Below")
    wait_until_idle(browser, 900)  # about a minute and a half on an idle 2-core machine
    second = run_probe(browser, root)
    assert second["learning_rate"] == pytest.approx(5e-3), second
    assert second["initial_lr"] == pytest.approx(5e-3), second
    assert second["r"] == 32, second
    print(f"browser test: {time.time() - started:.0f} s in JupyterLab")
