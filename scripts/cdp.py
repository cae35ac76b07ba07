"""A minimal Chrome DevTools Protocol driver for headless Chromium: open a page, run JavaScript, screenshot.

Just enough to click a tab of the Prefect UI and read what it shows, without a browser-automation
framework that would want to download its own browser.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import websockets

from lvdflow.net import free_port

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1100", "--remote-allow-origins=*"]


class Browser:
    def __init__(self) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if not exe:
            raise RuntimeError("chromium not found (Debian package 'chromium')")
        self.port = free_port()
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile.name}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2))
                self.ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                break
            except Exception:
                if time.time() > deadline:
                    self.close()
                    raise RuntimeError("chromium did not open its debugging port")
                time.sleep(0.3)
        self._id = 0

    async def __aenter__(self) -> "Browser":
        self.ws = await websockets.connect(self.ws_url, max_size=64 << 20)
        await self.send("Page.enable")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        self.close()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.profile.cleanup()

    async def send(self, method: str, **params):
        self._id += 1
        my_id = self._id
        await self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def js(self, expression: str):
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    async def wait_for_text(self, text: str, timeout: float = 30) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in (await self.js("document.body ? document.body.innerText : ''") or ""):
                return True
            await asyncio.sleep(0.5)
        return False

    async def click_text(self, text: str) -> bool:
        """Click the innermost element whose own text is exactly `text` (a tab, a button)."""
        return bool(await self.js(
            "(() => { const els = [...document.querySelectorAll('button, a, li, [role=tab], span, div')]"
            f".filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)});"
            " const el = els[els.length - 1]; if (!el) return false; el.click(); return true; })()"))

    async def screenshot(self, path: str | Path) -> None:
        data = (await self.send("Page.captureScreenshot", format="png"))["data"]
        Path(path).write_bytes(base64.b64decode(data))
