"""What users look at, in a real browser: Debian's headless Chromium renders a page, screenshots it, and
measures its layout (a script added to a copy of the page writes what it measured into the DOM Chromium
dumps)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Headless, and quiet on a machine without internet: no background connections, no updates.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _chromium(*args: str) -> str:
    assert shutil.which(CHROMIUM), "these tests need Debian's Chromium: apt-get install chromium (.ci/run does)"
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(page: Path, png: Path, width: int, height: int) -> Path:
    """``page`` as Chromium draws it in a window of ``width`` x ``height``, into ``png``."""
    _chromium(f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri())
    assert png.stat().st_size > 0
    return png


def measure(page: Path, script: str, width: int, height: int = 1000) -> dict:
    """Run ``script`` (the body of a function returning a JSON-able value) once a copy of ``page`` has loaded
    in a window of ``width`` x ``height``; return what it returned."""
    copy = page.with_name(f".measure-{page.name}")
    probe = ("<script>window.addEventListener('load', () => { const r = (() => {" + script + "})();"
             "document.body.setAttribute('data-measured', JSON.stringify(r)); });</script>")
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    try:
        dom = _chromium(f"--window-size={width},{height}", "--virtual-time-budget=5000", "--dump-dom",
                        copy.resolve().as_uri())
    finally:
        copy.unlink()
    found = re.search(r'data-measured="([^"]*)"', dom)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))
