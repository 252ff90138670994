"""A headless Chromium the tests can click in: the Chrome DevTools Protocol over a websocket (``websockets`` is
already installed with Prefect), enough to open a page, wait for it to render, read it and click a button.

Only what the end-to-end test needs; `_browse` in test_e2e_servers.py stays the one-shot screenshot + DOM dump.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import time
from pathlib import Path


class Browser:
    """One Chromium process with one page. Use as ``with Browser(exe, profile_dir) as b: b.goto(url) ...``."""

    def __init__(self, exe: str, profile: Path):
        import httpx
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-background-networking", "--window-size=1400,1000", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        endpoint = None
        for line in self.proc.stderr:  # Chromium prints its DevTools endpoint on stderr when it is ready
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                endpoint = f"http://127.0.0.1:{found.group(1)}"
                break
        if endpoint is None:
            self.proc.kill()
            raise RuntimeError(f"{exe} did not start its DevTools endpoint (exit {self.proc.wait()})")
        page = next(t for t in httpx.get(f"{endpoint}/json/list", timeout=30).json() if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=2**26, open_timeout=30)
        self._ids = itertools.count(1)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, **params):
        """One DevTools command; events that arrive meanwhile are dropped (nothing here subscribes to them)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, js: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{js}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, js: str, timeout: float = 60):
        """Poll ``js`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(js)
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"not true after {timeout} s: {js}")

    def screenshot(self, path: Path) -> None:
        import base64

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.kill()
            self.proc.wait(30)
