"""The HTML report in a real headless browser (Debian's chromium, `make browser` installs it).

Chromium is driven over the Chrome DevTools Protocol (websockets, already a Prefect dependency):
the page must load with no console errors or exceptions, make no request other than file: and
data: URLs, decode every <img>, and render a screenshot that is not blank.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import make_config
from tests.report_fixtures import write_upstream_outputs

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed: run `make browser` (apt-get install chromium) to check the HTML report",
)


class DevTools:
    """A minimal CDP client: commands get their answer, events are kept for inspection."""

    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        ident = next(self.ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        self.ws.close()


@contextlib.contextmanager
def chromium(tmp_path: Path):
    """A headless chromium with no network (a dead proxy) and its own profile; always terminated."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--mute-audio",
        # No network: every http(s) request goes to a closed local port and fails.
        "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
        f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1280,900", "about:blank",
    ]
    log = open(tmp_path / "chromium.log", "wb")  # noqa: SIM115 - closed below, after the process
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if process.poll() is not None:
                pytest.fail(f"chromium exited with {process.returncode}: {(tmp_path / 'chromium.log').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        tools = DevTools(f"ws://127.0.0.1:{port}{path}")
        try:
            yield tools
        finally:
            tools.close()
    finally:
        # Chromium forks helpers (zygote, renderers) into the session started above: end that group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        log.close()


def render(tools: DevTools, url: str, width: int = 1280, height: int = 900) -> dict[str, Any]:
    """Load `url` in a new tab; return console errors, requests, image states and a screenshot."""
    target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        tools.send(f"{domain}.enable", session=session)
    tools.send("Emulation.setDeviceMetricsOverride",
               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
    tools.events.clear()
    tools.send("Page.navigate", {"url": url}, session=session)
    tools.wait_for("Page.loadEventFired")
    images = tools.send("Runtime.evaluate", {
        "expression": "Promise.all(Array.from(document.images).map(i => i.decode().then(() => true, () => false)))"
                      ".then(ok => JSON.stringify(Array.from(document.images).map((i, k) => "
                      "({ok: ok[k], complete: i.complete, width: i.naturalWidth, alt: i.alt}))))",
        "awaitPromise": True, "returnByValue": True}, session=session)["result"]["value"]
    headings = tools.send("Runtime.evaluate", {
        "expression": "JSON.stringify(Array.from(document.querySelectorAll('h2')).map(h => h.textContent))",
        "returnByValue": True}, session=session)["result"]["value"]
    shot = tools.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
    errors = [e for e in tools.events if (
        e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")
        or e.get("method") == "Network.loadingFailed")]
    requests = [e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"]
    return {"images": json.loads(images), "headings": json.loads(headings), "errors": errors,
            "requests": requests, "screenshot": base64.b64decode(shot)}


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    # The report's files without MLflow or Prefect: the same writer the stage calls.
    from tasks.report import write_report_files

    root = tmp_path_factory.mktemp("browser")
    config = make_config(root)
    write_upstream_outputs(config, failed={"efficientnet_b0": "CUDA out of memory"})
    return write_report_files(config, list(config.models), {}).report_html


def test_report_renders_in_headless_chromium(report_html: Path, tmp_path: Path):
    with chromium(tmp_path) as tools:
        page = render(tools, report_html.as_uri())

    assert page["errors"] == [], page["errors"]
    assert all(url.startswith(("file:", "data:", "about:")) for url in page["requests"]), page["requests"]
    assert len(page["images"]) >= 8
    broken = [i["alt"] for i in page["images"] if not (i["ok"] and i["complete"] and i["width"] > 0)]
    assert broken == [], f"images that did not decode: {broken}"
    assert "Executive summary" in page["headings"] and "Environment" in page["headings"]

    (tmp_path / "screenshot.png").write_bytes(page["screenshot"])
    with Image.open(io.BytesIO(page["screenshot"])) as shot:
        rgb = shot.convert("RGB")
        assert rgb.size == (1280, 900)
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        non_white = sum(count for count, colour in colours if sum(colour) < 3 * 245)
    assert len(colours) > 20, "the screenshot is (nearly) a single colour"
    assert non_white > 0.02 * rgb.size[0] * rgb.size[1], "the screenshot is (nearly) blank"
