"""The HTML report in a real headless browser (Debian's chromium, `make browser` installs it).

Chromium is driven over the Chrome DevTools Protocol (websockets, already a Prefect dependency):
the page must load with no console errors or exceptions, make no request other than file: and
data: URLs, decode every <img>, and render a screenshot that is not blank. Without chromium these
tests are skipped, except under CI=true, where they fail: a CI run must not pass by skipping them.
`CHROMIUM` names another browser binary (a path or a command).
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
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import REPO, make_config
from tests.report_fixtures import write_upstream_outputs

CHROMIUM = shutil.which(os.environ["CHROMIUM"]) if os.environ.get("CHROMIUM") else (
    shutil.which("chromium") or shutil.which("/usr/bin/chromium"))
IN_CI = os.environ.get("CI", "").lower() == "true"
BROWSER_TEST = "tests/test_report_browser.py::test_report_renders_in_headless_chromium"


@pytest.fixture(scope="session")
def browser() -> str:
    """The chromium binary; without one a skip, or a failure under CI=true. Ask for it first."""
    if CHROMIUM is None:
        missing = "chromium is not installed: run `make browser` (apt-get install chromium) to check the HTML report"
        if IN_CI:
            pytest.fail(f"{missing} (CI=true: the browser tests may not be skipped)", pytrace=False)
        pytest.skip(missing)
    return CHROMIUM


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
def chromium(tmp_path: Path, binary: str):
    """A headless chromium with no network (a dead proxy) and its own profile; always terminated."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    args = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
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
    page = tools.send("Runtime.evaluate", {
        "expression": "JSON.stringify({title: document.title, tables: Array.from(document.querySelectorAll("
                      "'section')).map(s => [s.id, Array.from(s.querySelectorAll('table')).map(t => "
                      "Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.textContent.trim())))])})",
        "returnByValue": True}, session=session)["result"]["value"]
    shot = tools.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
    errors = [e for e in tools.events if (
        e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")
        or e.get("method") == "Network.loadingFailed")]
    requests = [e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"]
    page = json.loads(page)
    return {"images": json.loads(images), "headings": json.loads(headings), "errors": errors,
            "requests": requests, "screenshot": base64.b64decode(shot), "title": page["title"],
            "tables": dict(page["tables"])}


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    # The report's files without MLflow or Prefect: the same writer the stage calls.
    from tasks.report import write_report_files

    root = tmp_path_factory.mktemp("browser")
    config = make_config(root)
    write_upstream_outputs(config, failed={"efficientnet_b0": "CUDA out of memory"})
    return write_report_files(config, list(config.models), {}).report_html


def assert_page_loaded(page: dict[str, Any], min_images: int) -> None:
    """No console errors, nothing fetched from the network, every image decoded."""
    assert page["errors"] == [], page["errors"]
    assert all(url.startswith(("file:", "data:", "about:")) for url in page["requests"]), page["requests"]
    assert len(page["images"]) >= min_images
    broken = [i["alt"] for i in page["images"] if not (i["ok"] and i["complete"] and i["width"] > 0)]
    assert broken == [], f"images that did not decode: {broken}"
    assert "Executive summary" in page["headings"] and "Environment" in page["headings"]


def test_report_renders_in_headless_chromium(browser: str, report_html: Path, tmp_path: Path):
    with chromium(tmp_path, browser) as tools:
        page = render(tools, report_html.as_uri())

    assert_page_loaded(page, min_images=8)
    (tmp_path / "screenshot.png").write_bytes(page["screenshot"])
    with Image.open(io.BytesIO(page["screenshot"])) as shot:
        rgb = shot.convert("RGB")
        assert rgb.size == (1280, 900)
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        non_white = sum(count for count, colour in colours if sum(colour) < 3 * 245)
    assert len(colours) > 20, "the screenshot is (nearly) a single colour"
    assert non_white > 0.02 * rgb.size[0] * rgb.size[1], "the screenshot is (nearly) blank"


def test_real_demo_report_renders_in_headless_chromium(browser: str, demo_run, tmp_path: Path):
    """The report of a real demo benchmark, not fixture files: title, the models in the summary table."""
    config = demo_run["config"]
    with chromium(tmp_path, browser) as tools:
        page = render(tools, (config.paths.reports / "report.html").as_uri())

    assert_page_loaded(page, min_images=5)
    assert page["title"] == config.report.title
    [summary] = page["tables"]["summary-table"]
    rows = {row[0].split()[0]: row for row in summary[1:]}  # "resnet50 (deploy)" -> resnet50
    assert sorted(rows) == sorted(config.models), summary
    assert all("FAILED" not in row[0] and row[1][:1].isdigit() for row in rows.values()), summary


@pytest.mark.parametrize("ci", [True, False])
def test_missing_chromium_fails_under_ci_and_skips_elsewhere(tmp_path: Path, ci: bool):
    env = {**os.environ, "CHROMIUM": str(tmp_path / "no-chromium"), "FOOD101_TEST_STATE": str(tmp_path / "state")}
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", BROWSER_TEST],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if ci:
        assert done.returncode == 1, done.stdout
        assert "CI=true: the browser tests may not be skipped" in done.stdout
    else:
        assert done.returncode == 0, done.stdout
        assert "1 skipped" in done.stdout


@pytest.mark.parametrize("ci", [True, False])
def test_make_browser_fails_under_ci_when_chromium_cannot_be_installed(tmp_path: Path, ci: bool):
    bin_dir = tmp_path / "bin"  # no chromium here, and an apt-get that fails
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho 'E: no network' >&2\nexit 100\n")
    (bin_dir / "apt-get").chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), **({"CI": "true"} if ci else {})}
    done = subprocess.run([shutil.which("make"), "-s", "-C", str(REPO), "browser"], env=env, capture_output=True,
                          text=True, timeout=60)
    if ci:
        assert done.returncode != 0 and "CI=true" in done.stderr, done
    else:
        assert done.returncode == 0 and "will be skipped" in done.stdout, done
