"""A real-browser harness: JupyterLab on 127.0.0.1, driven in Debian's chromium by Playwright.

``JupyterLab(root)`` starts the virtual environment's ``jupyter lab`` on a free port with a
random token, its settings, workspaces and runtime files in a temporary folder (so nothing of
the user's own JupyterLab leaks in). ``LabPage`` opens a notebook in a Playwright page, runs all
cells through the Run menu as a person would, waits until the kernel is idle and every cell has
run, and saves screenshots (their paths are printed, so ``pytest -s`` lists them).

Playwright's own browser download does not work on these machines: the system chromium is
launched through ``executable_path``. Without chromium the tests skip, unless ``CI`` is set,
where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 1000}  # the window size the layout checks are made at

# JupyterLab settings for a quiet, reproducible page: no news or update toasts over the widget.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}


def find_chromium() -> str:
    """The system chromium; skips the test without one, fails it when ``CI`` is set."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("No chromium on PATH: install Debian's chromium (apt-get install chromium); "
                    "Playwright's own browser download does not work here.")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def sync_playwright():
    """Playwright's sync API; skips (fails under ``CI``) when the package is missing."""
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("playwright is not installed: pip install -r requirements.txt")
        pytest.skip("playwright is not installed (pip install -r requirements.txt)")
    return start()


@pytest.fixture(scope="module", name="browser")
def figure_browser():
    """``browser``: a headless chromium for drawing figures on pages of their own, one per
    module (import it into a test module to use it)."""
    chromium = find_chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


def draw_figure(browser, fig, path: Path, width: int = 900):
    """``fig`` drawn by plotly.js at ``width`` pixels, as in a notebook's output area, on a page
    of its own (saved beside ``path``); a screenshot at ``path``. Returns the page."""
    from plotly.offline import get_plotlyjs  # only the figure tests draw plotly pages

    page = browser.new_page(viewport={"width": width + 100, "height": 700})
    path.with_suffix(".html").write_text(
        f"<html><head><script>{get_plotlyjs()}</script></head><body>"
        + fig.to_html(full_html=False, include_plotlyjs=False, default_width=f"{width}px",
                      div_id="fig") + "</body></html>")
    page.goto(path.with_suffix(".html").as_uri())
    page.wait_for_selector("#fig .main-svg")
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """``jupyter lab`` serving ``root`` on 127.0.0.1 with a random token; a context manager."""

    def __init__(self, root: str | Path, home: str | Path, timeout: float = 120.0):
        self.root, self.home = Path(root), Path(home)
        self.token, self.port = secrets.token_hex(16), free_port()
        self.timeout = timeout
        self.log = self.home / "jupyter_lab.log"
        self.process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str):
        request = urllib.request.Request(f"{self.base}/api/{path}",
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def __enter__(self) -> JupyterLab:
        settings = self.home / "user-settings"
        for name, values in LAB_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        # The user's own config and kernels stay out: the kernel is this environment's python3.
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(self.home / "config"),
               "JUPYTER_DATA_DIR": str(self.home / "data"),
               "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"),
               "JUPYTERLAB_SETTINGS_DIR": str(settings),
               "JUPYTERLAB_WORKSPACES_DIR": str(self.home / "workspaces")}
        jupyter = Path(sys.executable).parent / "jupyter"  # the virtual environment's own
        command = [str(jupyter), "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                   f"--port={self.port}", f"--ServerApp.token={self.token}",
                   f"--ServerApp.root_dir={self.root}", "--ServerApp.port_retries=0",
                   "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        env=env, cwd=self.root)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited ({self.process.returncode}):\n"
                                   + self.log.read_text()[-3000:])
            try:
                self.api("status")
                return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"jupyter lab did not answer in {self.timeout} s; log {self.log}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # shuts its kernels down too
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log_file.close()

    def kernels_idle(self) -> bool:
        return all(k["execution_state"] == "idle" for k in self.api("kernels"))


class LabPage:
    """One chromium page on a JupyterLab notebook, with the steps a person takes."""

    def __init__(self, lab: JupyterLab, page, shots: Path):
        self.lab, self.page, self.shots = lab, page, Path(shots)
        self.shots.mkdir(parents=True, exist_ok=True)
        self.errors: list[str] = []  # uncaught page errors (the widgets' JavaScript)
        page.on("pageerror", lambda err: self.errors.append(str(err)))

    def screenshot(self, name: str, full_page: bool = False) -> Path:
        path = self.shots / f"{len(list(self.shots.glob('*.png'))):02d}_{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        print(f"screenshot: {path}")
        return path

    def open_notebook(self, path: str, timeout: float = 120.0) -> None:
        """Open ``path`` (relative to the server's root) and wait for its kernel to be idle."""
        self.page.goto(self.lab.url(f"lab/tree/{path}"))
        self.page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=timeout * 1000)
        self.wait_for(lambda: self._session_idle(path), timeout, f"the kernel of {path} to start")
        self.path = path

    def _session_idle(self, path: str) -> bool:
        sessions = [s for s in self.lab.api("sessions") if s["path"].endswith(path)]
        return bool(sessions) and sessions[0]["kernel"]["execution_state"] == "idle"

    def run_all(self, timeout: float = 600.0) -> None:
        """Run > Run All Cells, from the menu bar; wait until every code cell ran or one failed."""
        self.menu("Run", "Run All Cells")
        self.wait_for(lambda: self.prompts()[0] in ("*", "") or self.prompts()[0].isdigit(),
                      30, "the first cell to start")
        self.wait_until_idle(timeout)

    def menu(self, menu: str, item: str) -> None:
        """Click ``item`` of the menu bar's ``menu``, e.g. ("File", "Save Notebook")."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=menu).first.click()
        self.page.locator(".lm-Menu-itemLabel", has_text=item).first.click()

    def save(self) -> None:
        """File > Save Notebook; waits until the tab no longer shows unsaved changes."""
        self.menu("File", "Save Notebook")
        self.page.wait_for_selector(".jp-mod-current.jp-mod-dirty", state="detached")

    def reload(self, timeout: float = 120.0) -> None:
        """Reload the browser page and wait for the notebook and its kernel again."""
        self.page.reload()
        self.page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=timeout * 1000)
        self.wait_for(lambda: self._session_idle(self.path), timeout, "the kernel after reload")

    def prompts(self) -> list[str]:
        """Each code cell's execution prompt: '' (not run), '*' (queued or running), or 'n'."""
        # textContent: cells scrolled out of view are not laid out, and have no innerText
        texts = self.page.locator(".jp-CodeCell .jp-InputPrompt").all_text_contents()
        return [t.strip().removeprefix("[").removesuffix("]:").strip() for t in texts]

    def error_outputs(self) -> list[str]:
        """The tracebacks shown (JupyterLab renders errors as stderr text, as it does logs)."""
        texts = self.page.locator(".jp-OutputArea-output[data-mime-type="
                                  "'application/vnd.jupyter.stderr']").all_text_contents()
        return [t for t in texts if "Traceback (most recent call last)" in t]

    def wait_until_idle(self, timeout: float = 600.0) -> None:
        """Until no cell is queued or running and the kernel is idle (twice in a row)."""
        def settled() -> bool:
            return "*" not in self.prompts() and self.lab.kernels_idle()
        self.wait_for(lambda: settled() and (time.sleep(1.0) or settled()), timeout,
                      "the kernel to finish")

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            self.page.wait_for_timeout(500)
        shot = self.screenshot("timeout")
        raise TimeoutError(f"Waited {timeout:.0f} s for {what}; prompts {self.prompts()}; "
                           f"screenshot {shot}")

    def sidebar_open(self) -> bool:
        return self.page.locator("#filebrowser").is_visible()


class Chromium:
    """Playwright's chromium on the system browser; ``new_page`` opens 1,400 x 1,000 pages."""

    def __init__(self):
        self.executable = find_chromium()
        self._playwright = sync_playwright()

    def __enter__(self) -> Chromium:
        self.playwright = self._playwright.__enter__()
        self.browser = self.playwright.chromium.launch(executable_path=self.executable,
                                                       args=CHROMIUM_ARGS)
        return self

    def new_page(self, lab: JupyterLab, shots: Path) -> LabPage:
        page = self.browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(60_000)
        return LabPage(lab, page, shots)

    def __exit__(self, *exc) -> None:
        self.browser.close()
        self._playwright.__exit__(*exc)


@contextlib.contextmanager
def notebook_after_run_all(root: str | Path, notebook: str, home: str | Path,
                           timeout: float = 900.0, shot_opened: bool = False) -> Iterator[LabPage]:
    """JupyterLab on ``root`` and chromium, with ``notebook`` open after Run All: the page every
    widget test starts from. Screenshots go to ``home/screenshots``."""
    home = Path(home)
    chromium = Chromium()
    with JupyterLab(root, home) as lab, chromium:
        page = chromium.new_page(lab, home / "screenshots")
        page.open_notebook(notebook)
        if shot_opened:
            page.screenshot("opened")
        page.run_all(timeout=timeout)
        yield page


def prepared_notebook(root: Path, stem: str, notebook: str) -> Path:
    """Notebook ``stem`` with its smoke parameters (papermill's injected cell, not run) at
    ``root / notebook``, reading the run folder ``SAE_NB_MAIN_RUN`` names (a main job already
    made), else a fresh smoke run of notebook 01 in ``root/outputs/smoke``; that run folder."""
    import papermill  # imported here: only the tests that prepare a notebook need it

    from sae_nb.running.notebooks import NOTEBOOKS_DIR, SMOKE_PARAMETERS

    Chromium()  # skip (or fail under CI) before the long steps when there is no browser
    (root / notebook).parent.mkdir(parents=True, exist_ok=True)
    run_dir = root / "outputs" / "smoke"
    if run := os.environ.get("SAE_NB_MAIN_RUN"):
        run_dir = Path(run).resolve()
    else:
        subprocess.run([sys.executable, "-m", "sae_nb", "run", "--smoke", "--only", "01",
                        "--run", str(run_dir)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    params = {**SMOKE_PARAMETERS[stem], "run_dir": str(run_dir)}
    papermill.execute_notebook(str(NOTEBOOKS_DIR / f"{stem}.ipynb"), str(root / notebook),
                               parameters=params, prepare_only=True, kernel_name="python3")
    return run_dir

