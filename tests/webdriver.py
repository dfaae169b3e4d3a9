"""A headless Chromium driven through chromedriver's W3C WebDriver HTTP API (urllib only).

    paths = find_browser()                       # None: no chromium / chromedriver here
    with Browser(*paths) as browser:
        browser.open("file:///tmp/report.html")
        browser.click(".words .word[data-index='0']")
        browser.run("return document.title")
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,900"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


def find_browser() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` paths, or None when either is missing."""
    chromium = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                     if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


class Browser:
    """One chromedriver process and one session of a fresh Chromium profile."""

    def __init__(self, chromium: str, driver: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.profile = tempfile.TemporaryDirectory(prefix="mmlens-chromium-")
        self.process = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        try:
            self._wait_ready()
            options = {"binary": chromium,
                       "args": CHROMIUM_ARGS + [f"--user-data-dir={self.profile.name}"]}
            reply = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "goog:chromeOptions": options}}})
            self.session = f"/session/{reply['sessionId']}"
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"chromedriver did not start on {self.base}")
            time.sleep(0.2)

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"WebDriver {method} {path}: {error.read().decode()}") from None

    def open(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body: ``return ...``) in the page."""
        return self._call("POST", f"{self.session}/execute/sync",
                          {"script": script, "args": list(args)})

    def click(self, selector: str) -> None:
        """A real click (pointer events through the browser) on the first match."""
        element = self._call("POST", f"{self.session}/element",
                             {"using": "css selector", "value": selector})
        self._call("POST", f"{self.session}/element/{element[ELEMENT]}/click", {})

    def close(self) -> None:
        if hasattr(self, "session"):
            try:
                self._call("DELETE", self.session)
            except (RuntimeError, urllib.error.URLError, ConnectionError):
                pass
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
