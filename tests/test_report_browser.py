"""The HTML report opened in a real headless Chromium (Debian's ``chromium``; ``.ci/run``
installs it): no console error, every chart drawn, a screenshot that is not blank.

The browser is driven over the Chrome DevTools Protocol with tornado's websocket client
(tornado comes with bokeh), so no browser-automation package is needed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import orjson
import pytest
from report_helpers import all_quarantined_run

from nautilus_pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
pytest.importorskip("bokeh", reason="the HTML report needs bokeh (the 'report' extra)")

_PROBE = """(() => {
  const d = window.Bokeh && Bokeh.documents[0];
  const figures = d ? [...d.all_models].filter(m => m.type === 'Figure').map(m => m.title.text) : [];
  let canvases = 0, elements = 0;
  const walk = (n) => {
    if (!n) return;
    if (n.tagName === 'CANVAS' && n.width > 0 && n.height > 0) canvases++;
    if (n.classList && [...n.classList].some(c => c.startsWith('bk-Figure'))) elements++;
    if (n.shadowRoot) walk(n.shadowRoot);
    for (const k of n.children || []) walk(k);
  };
  walk(document.body);
  return JSON.stringify({idle: d ? d.is_idle : false, figures, canvases, elements,
                         loaded: document.readyState === 'complete',
                         text: document.body ? document.body.innerText : ''});
})()"""


class Browser:
    """One headless Chromium page over the DevTools Protocol; records console errors."""

    def __init__(self, tmp: Path):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-port=0", f"--user-data-dir={tmp}", "--window-size=1250,2400",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.errors: list[str] = []
        self._id = 0

    async def connect(self) -> None:
        from tornado.websocket import websocket_connect

        port = await asyncio.to_thread(self._devtools_port)
        raw = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        url = next(t["webSocketDebuggerUrl"] for t in orjson.loads(raw) if t["type"] == "page")
        self.ws = await websocket_connect(url, max_message_size=64 << 20)
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            await self.call(method)

    def _devtools_port(self) -> int:
        for line in self.proc.stderr:
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                return int(m.group(1))
        raise RuntimeError("chromium exited before it listened for DevTools")

    async def call(self, method: str, **params) -> dict:
        self._id += 1
        my = self._id
        await self.ws.write_message(orjson.dumps({"id": my, "method": method, "params": params}).decode())
        while True:
            msg = orjson.loads(await asyncio.wait_for(self.ws.read_message(), 30))
            if msg.get("id") == my:
                assert "error" not in msg, msg
                return msg["result"]
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(p["exceptionDetails"].get("text", "") + " "
                               + p["exceptionDetails"].get("exception", {}).get("description", ""))
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            self.errors.append(p["entry"]["text"])

    async def open(self, path: Path) -> dict:  # path absolute (tmp_path): as_uri needs no I/O
        """Load the page and wait until bokeh says every view is drawn (idle), or, for a page with
        nothing to draw, until the document is loaded."""
        await self.call("Page.navigate", url=path.as_uri())
        for _ in range(150):
            state = orjson.loads((await self.call("Runtime.evaluate", expression=_PROBE,
                                                  returnByValue=True))["result"]["value"])
            # a page with nothing to draw has no bokeh document to be idle: wait for the whole
            # page (its heading is in the text before the accounting below it is parsed)
            if state["idle"] or (state["loaded"] and "nothing to draw" in state["text"]):
                return state
            await asyncio.sleep(0.1)
        return state

    async def screenshot(self) -> np.ndarray:
        import matplotlib.image as mpimg

        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return mpimg.imread(io.BytesIO(base64.b64decode(shot["data"])), format="png")

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stderr.close()


@pytest.fixture
async def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    try:
        await b.connect()
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def default_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default")
    assert main(["run", str(REPO / "pipelines" / "default.toml"), "--out", str(out)]) == 0
    assert main(["report", str(out), "--html"]) == 0
    import structlog

    structlog.reset_defaults()
    return out / "report.html"


async def test_html_report_draws_every_chart_without_console_errors(browser, default_report, tmp_path):
    state = await browser.open(default_report)
    assert browser.errors == []
    assert state["idle"] is True
    assert state["figures"] == [
        "BTCUSDT-PERP: price, bid/ask and entries/exits", "position",
        "simulated P&L after fees, and drawdown",
        "VPIN, toxic buckets and the running CDF that flags them (dashed: toxic above CDF 0.9)",
        "per-stage batch latency over the run (solid p50, dashed p99)",
    ]
    assert state["elements"] == 5 and state["canvases"] >= 5
    for figure in ("net P&L", "max drawdown", "fills", "round trips", "turnover", "fees paid",
                   "hit rate", "exposure time", "quarantined", "code version", "machine"):
        assert figure in state["text"], figure
    png = await browser.screenshot()
    rgb = png[..., :3]
    ink = float((rgb.min(axis=2) < 0.9).mean())
    colours = np.unique((rgb[::4, ::4] * 255).astype(np.uint8).reshape(-1, 3), axis=0).shape[0]
    assert png.shape[0] > 2000 and ink > 0.03 and colours > 50, (png.shape, ink, colours)
    # the chart area (below the tables) has ink too, not only the header text
    assert float((rgb[900:, :, :].min(axis=2) < 0.9).mean()) > 0.02


@pytest.fixture(scope="module")
def empty_report(tmp_path_factory) -> Path:
    """A run whose every row is quarantined (negative prices): nothing reaches the stages."""
    out = all_quarantined_run(tmp_path_factory.mktemp("allbad"), 19).parent
    assert main(["report", str(out / "out"), "--html"]) == 0
    import structlog

    structlog.reset_defaults()
    return out / "out" / "report.html"


async def test_html_report_of_a_run_with_nothing_to_draw_opens_cleanly(browser, empty_report):
    state = await browser.open(empty_report)
    assert browser.errors == []
    assert "nothing to draw" in state["text"] and "quarantined 19" in state["text"]
    assert state["figures"] == [] and state["canvases"] == 0
