"""Headless Chromium for tests: dump a page's DOM, screenshot it, and list every request the page makes.

``chromium --headless --dump-dom`` / ``--screenshot`` give what a reader's
browser renders. Which network requests the *page* makes comes from the
DevTools protocol over a pipe (``--remote-debugging-pipe``: file descriptors
3 and 4, JSON messages ending in NUL): the page is opened in its own target
with ``Network.enable``, and every ``Network.requestWillBeSent`` of that
target is recorded until the load event (plus a short grace period). The
browser's own background traffic (component updates, time sync) does not
belong to the page's target and is not counted; host names resolve to
nothing (``--host-resolver-rules``), so no request leaves the machine even
when a page asks for one.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

__all__ = ["BASE_FLAGS", "chromium", "dump_dom", "page_requests", "parse_sections", "remote_references", "screenshot"]

BASE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
              "--host-resolver-rules=MAP * ~NOTFOUND")


def chromium() -> str | None:
    """The Chromium binary (Debian's ``chromium``), or None when it is not installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="medfed-chromium-") as profile:
        return subprocess.run([chromium() or "chromium", *BASE_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(page: Path) -> str:
    """The DOM after load (``--dump-dom``)."""
    proc = _run(["--dump-dom", page.resolve().as_uri()])
    if proc.returncode != 0:
        raise RuntimeError(f"chromium --dump-dom failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 3000) -> Path:
    """A PNG screenshot of the page's first ``height`` pixels (``--screenshot``)."""
    proc = _run([f"--screenshot={out}", f"--window-size={width},{height}", "--hide-scrollbars",
                 page.resolve().as_uri()])
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium --screenshot failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


class _Pipe:
    """The DevTools protocol over ``--remote-debugging-pipe``."""

    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc, self.w, self.r = proc, to_browser, from_browser
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def _read(self, deadline: float) -> dict[str, Any] | None:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\0")
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 60) -> dict[str, Any]:
        mid = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read(deadline)
            if msg is None:
                raise TimeoutError(f"no answer to {method}")
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result") or {})
            self.events.append(msg)

    def wait_for(self, method: str, session: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            return True
        while True:
            msg = self._read(deadline)
            if msg is None:
                return False
            self.events.append(msg)
            if msg.get("method") == method and msg.get("sessionId") == session:
                return True

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (msg := self._read(deadline)) is not None:
            self.events.append(msg)


def page_requests(page: Path, grace: float = 1.5, timeout: float = 120) -> list[str]:
    """The URL of every request the page makes while loading (and ``grace`` seconds after its load event).

    The page itself (its ``file://`` URL) and ``data:`` URLs are included;
    a self-contained page makes no other request.
    """
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="medfed-chromium-") as profile:
        # chromium reads commands on fd 3 and writes replies on fd 4
        def child_fds() -> None:
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)  # out of the way of 3 and 4 first
            os.dup2(a, 3)
            os.dup2(b, 4)

        proc = subprocess.Popen([chromium() or "chromium", *BASE_FLAGS, f"--user-data-dir={profile}",
                                 "--remote-debugging-pipe", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=(3, 4), preexec_fn=child_fds)
        os.close(to_browser_r)
        os.close(from_browser_w)
        cdp = _Pipe(proc, to_browser_w, from_browser_r)
        try:
            target = cdp.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            cdp.call("Network.enable", session=session)
            cdp.call("Page.enable", session=session)
            cdp.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            if not cdp.wait_for("Page.loadEventFired", session, timeout):
                raise TimeoutError(f"{page.name} did not finish loading in {timeout} s")
            cdp.drain(grace)
            try:
                cdp.call("Browser.close", timeout=10)
            except (RuntimeError, TimeoutError):
                pass
        finally:
            os.close(to_browser_w)
            os.close(from_browser_r)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [e["params"]["request"]["url"] for e in cdp.events
                if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session]


class _Sections(HTMLParser):
    """Text and images inside each ``<section id=...>``, and every src/href of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.images: dict[str, int] = {}
        self.links: list[str] = []
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self._current = a.get("id") or ""
            self.text.setdefault(self._current, "")
            self.images.setdefault(self._current, 0)
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(str(a[key]))
        if tag == "img" and self._current is not None:
            self.images[self._current] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._current = None

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self.text[self._current] += data


def parse_sections(html: str) -> _Sections:
    """The sections of a report page (also used by the browser test on the DOM chromium dumps)."""
    p = _Sections()
    p.feed(html)
    return p


def remote_references(html: str) -> list[str]:
    """``src``/``href`` values that point elsewhere (``http://``, ``https://``, ``//host``, ``file://``...),
    and CSS ``url()``s / ``@import``s of other hosts: a self-contained page has none."""
    parsed = parse_sections(html)
    bad = [u for u in parsed.links if re.match(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", u, re.IGNORECASE)]
    bad += re.findall(r"url\(\s*['\"]?\s*(?:https?:)?//[^)]*\)", html, re.IGNORECASE)
    bad += re.findall(r"@import\s+['\"]?(?:https?:)?//[^;]*", html, re.IGNORECASE)
    return bad
