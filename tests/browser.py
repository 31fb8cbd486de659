"""The real app in a real browser: `streamlit run` on a free localhost port, Debian's
Chromium driven by Playwright, and a tab that knows when each script run is done.
Shared by the browser tests and the benchmarks.

A tab waits for its own script runs by watching its websocket for Streamlit's
`script_finished` message, then for no stale elements, no loading skeleton, and every Plotly
chart drawn (`.js-plotly-plot .main-svg`). Plotted values are read from the graph divs' `data`.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from playwright.sync_api import BrowserContext, Frame, Page, sync_playwright
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"  # screenshots and the server log
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN_TIMEOUT = 120.0  # seconds for one script run and its charts, on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

class AppFailed(RuntimeError):
    """The app did not start, or a run did not finish."""


@contextmanager
def running_app(log_path: Path, env: dict[str, str] | None = None, port: int | None = None,
                options: tuple[str, ...] = ()) -> Iterator[str]:
    """`streamlit run app.py` on localhost (`port`, or a free one) with Streamlit `options`
    (e.g. "--server.disconnectedSessionTTL", "5"); yields its URL once it answers
    `/_stcore/health`, and stops it afterwards. Its output goes to `log_path`."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
               "--server.address", "127.0.0.1", "--server.headless", "true",
               # No file watcher: its inotify queue overflows on a busy machine, and nothing changes.
               "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false", *options]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=(env or os.environ) | {"HF_HUB_OFFLINE": "1"},
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AppFailed(f"the app exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.read() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AppFailed(f"the app did not answer on {url} within 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    """Debian's Chromium (never a downloaded build) with a fresh profile in `profile`."""
    if not Path(CHROMIUM).is_file():
        raise AppFailed(f"{CHROMIUM} is missing: `bash scripts/run_tests.sh` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


SETTLED = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    return app !== null && app.dataset.testScriptState === 'notRunning'
        && app.dataset.testConnectionState === 'CONNECTED'
        && document.querySelector('[data-stale="true"], [data-testid="stSkeleton"]') === null
        && Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"], .js-plotly-plot'))
            .every(chart => chart.querySelector('.main-svg'));
}"""

FIGURES = """() => Object.fromEntries(Array.from(document.querySelectorAll('.js-plotly-plot')).map(plot => {
    const box = plot.closest('[class*="st-key-"]');
    const key = box ? Array.from(box.classList).find(c => c.startsWith('st-key-')).slice(7) : '';
    return [key, JSON.parse(JSON.stringify(plot.data, (name, value) => name === '_inputArray' ? undefined : value))];
}))"""

ROUTING_VIEW = 'iframe[title="Routing view"]'  # the Analyse page's in-browser view (moeviz.views.routing_view)

TOKEN_VIEW = """() => Array.from(document.querySelectorAll('#tokens .tok')).map(
    span => [span.textContent, getComputedStyle(span).backgroundColor])"""

INJECTED = """() => ({
    images: document.querySelectorAll('img[src="x"], img[onerror]').length,
    links: document.querySelectorAll('a[href^="javascript"]').length,
    scripts: Array.from(document.querySelectorAll('script:not([type="application/json"])'))
        .filter(s => s.text.includes('alert(1)')).length,
    bold: Array.from(document.querySelectorAll('.moeviz-token-view b, .moeviz-token-view img, #tokens b, #tokens img')).length,
})"""


class AppPage:
    """A tab on the app that knows when each script run, and its charts, are done."""

    def __init__(self, page: Page, url: str):
        self.page, self.url = page, url
        self.finished = 0  # script runs completed, counted from the websocket
        self.runs: list[tuple[float, float]] = []  # (start, end), time.monotonic()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self._started = 0.0
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("websocket", self._watch)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _watch(self, websocket) -> None:
        def frame(payload):
            if isinstance(payload, str):
                return
            message = ForwardMsg()
            message.ParseFromString(payload)
            kind = message.WhichOneof("type")
            if kind == "new_session":
                self._started = time.monotonic()
            elif kind == "script_finished" and message.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                self.finished += 1
                self.runs.append((self._started, time.monotonic()))

        websocket.on("framereceived", frame)

    # actions

    def open(self, path: str = "") -> AppPage:
        return self.act(lambda: self.page.goto(f"{self.url}/{path}"))

    def act(self, action) -> AppPage:
        """Do `action`, then wait for the script run it causes and for every chart."""
        before = self.finished
        action()
        self.wait_for_run(before)
        return self

    def wait_for_run(self, before: int) -> float:
        """Wait until more than `before` runs have finished and the page shows the last one;
        returns when it first did (time.monotonic())."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while self.finished <= before:
            if time.monotonic() > deadline:
                raise AppFailed(f"no script run finished within {RUN_TIMEOUT:.0f} s")
            self.page.wait_for_timeout(10)
        self.page.wait_for_function(SETTLED, timeout=RUN_TIMEOUT * 1000, polling="raf")
        shown = time.monotonic()
        self.page.wait_for_timeout(100)  # settled again later: React had committed every delta
        self.page.wait_for_function(SETTLED, timeout=RUN_TIMEOUT * 1000, polling=100)
        exceptions = self.page.locator('[data-testid="stException"]').all_inner_texts()
        if exceptions:
            raise AppFailed(f"the page shows an exception: {exceptions}")
        return shown

    def start_typing(self, key: str, text: str) -> None:
        """Put `text` in text area `key` without sending it yet."""
        self.page.locator(f".st-key-{key} textarea").fill(text)

    def send(self, key: str) -> None:
        self.page.locator(f".st-key-{key} textarea").press("Control+Enter")

    def enter_text(self, key: str, text: str) -> AppPage:
        return self.act(lambda: (self.start_typing(key, text), self.send(key)))

    def paste_text(self, key: str, text: str) -> AppPage:
        """Replace the text as a person does: select all, paste from the clipboard, Ctrl+Enter."""
        area = self.page.locator(f".st-key-{key} textarea")
        self.page.evaluate("text => navigator.clipboard.writeText(text)", text)

        def paste():
            area.click()
            area.press("Control+A")
            area.press("Control+V")
            area.press("Control+Enter")

        return self.act(paste)

    def set_model_source(self, source: str) -> AppPage:
        field = self.page.locator(".st-key-model_source input")
        return self.act(lambda: (field.fill(source), field.press("Enter")))

    # what the page shows

    def text_value(self, key: str) -> str:
        return self.page.locator(f".st-key-{key} textarea").input_value()

    def token_counts(self) -> list[int]:
        captions = self.page.locator('[data-testid="stCaptionContainer"]').all_inner_texts()
        return [int(m.group(1).replace(",", "")) for c in captions if (m := re.match(r"([\d,]+) tokens? · ", c))]

    def alerts(self, where: str = "") -> list[str]:
        return self.page.locator(f'{where} [data-testid="stAlert"]'.strip()).all_inner_texts()

    def subheaders(self) -> list[str]:
        return self.page.locator("h3").all_inner_texts()

    def figures(self) -> dict[str, list[dict]]:
        """{chart key: Plotly traces as drawn}, typed arrays decoded to numpy."""
        return {key: [decode(trace) for trace in traces] for key, traces in self.page.evaluate(FIGURES).items()}

    def routing_view(self) -> Frame:
        """The document inside the Analyse page's routing view, once its script has drawn it."""
        frame = self.page.locator(ROUTING_VIEW).element_handle().content_frame()
        frame.wait_for_function("() => document.body && document.body.dataset.shown !== undefined",
                                timeout=RUN_TIMEOUT * 1000)
        return frame

    def token_view(self) -> list[tuple[str, str]]:
        """(text, background colour) of each token in the routing view."""
        return [tuple(row) for row in self.routing_view().evaluate(TOKEN_VIEW)]

    def view_layer(self, key: str) -> int:
        """Press `key` on the routing view's layer slider; returns the layer index it then shows."""
        frame = self.routing_view()
        before = int(frame.evaluate("() => +document.body.dataset.switches || 0"))
        frame.locator("#layer").press(key)
        frame.wait_for_function("before => (+document.body.dataset.switches || 0) > before", arg=before)
        return int(frame.evaluate("() => document.body.dataset.shown"))

    def screenshot(self, name: str) -> None:
        """The whole page, not just the viewport: the window grows to the page's height."""
        height = self.page.evaluate("""() => Math.max(...['stMain', 'stSidebarContent'].map(
            id => (document.querySelector(`[data-testid="${id}"]`) || document.body).scrollHeight))""")
        size = self.page.viewport_size
        self.page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]), 12000)})
        self.page.wait_for_function(SETTLED, timeout=RUN_TIMEOUT * 1000, polling=100)
        self.page.screenshot(path=ARTIFACTS / f"{name}.png")
        self.page.set_viewport_size(size)

    def assert_inert(self) -> None:
        """No dialog opened, no script error, no markup from the text became elements."""
        assert not self.dialogs, self.dialogs
        assert not self.errors, self.errors
        clean = {"images": 0, "links": 0, "scripts": 0, "bold": 0}
        assert self.page.evaluate(INJECTED) == clean
        if self.page.locator(ROUTING_VIEW).count():
            assert self.routing_view().evaluate(INJECTED) == clean


def decode(value):
    """Plotly's typed-array JSON ({dtype, bdata, shape}) as numpy, recursively."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return array.reshape([int(n) for n in str(shape).split(",")]) if shape else array
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    return value
