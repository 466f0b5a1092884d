"""Debian's headless Chromium, for tests that look at the Dagster UI as a person does: the
page as rendered after its scripts ran (not its GraphQL), and a screenshot of it."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# As the machine's probe starts it: no sandbox (root), no GPU, and no background connections,
# which this machine's closed network would refuse many at a time.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
WINDOW = "1600,1000"
# Virtual time the page gets to load and render (its requests to the webserver included).
RENDER_BUDGET_MS = 20000


def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "Debian's chromium is needed for the UI tests; .ci/run installs it"
    return found


def _run(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="spark-backup-chromium-") as profile:
        return subprocess.run(
            [
                chromium(),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={WINDOW}",
                f"--virtual-time-budget={RENDER_BUDGET_MS}",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )


def rendered_dom(url: str) -> str:
    """The page's DOM once its scripts have rendered it."""
    return _run(url, "--dump-dom").stdout


def rendered_text(url: str, showing: tuple[str, ...], attempts: int = 3) -> str:
    """The page's visible text once it shows every one of ``showing``: on a loaded machine
    the page may not have fetched or drawn its data within the virtual time budget, so it is
    rendered again (at most ``attempts`` times) before the caller judges the last one."""
    for _ in range(attempts):
        text = visible_text(rendered_dom(url))
        if all(item in text for item in showing):
            break
    return text


def screenshot(url: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(url, f"--screenshot={path}")
    assert path.stat().st_size > 10_000, f"{path}: the screenshot is (nearly) empty"
    return path


def visible_text(dom: str) -> str:
    """The page's text as a person reads it: scripts and styles dropped, every element's text
    separated by " | " (so that "Failed" next to "checksum" reads "checksum | Failed")."""
    text = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    text = re.sub(r"<[^>]+>", " | ", text)
    return html.unescape(re.sub(r"(\s*\|\s*)+", " | ", text))
