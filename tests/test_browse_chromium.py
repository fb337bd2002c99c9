"""The static site renders in a real headless browser: rows come from its inline JavaScript."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from explainer.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(args: list[str], profile: Path) -> str:
    res = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                         capture_output=True, text=True, timeout=120)
    return res.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_site_renders_in_headless_chromium(filled_db: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    assert main(["browse", "--db", str(filled_db), "--out", str(site), "--json"]) == 0
    dom = _chromium(["--dump-dom", (site / "index.html").as_uri()], tmp_path / "profile")
    # The table body is filled by the page's script, so these prove the JavaScript ran.
    assert "3 latents" in dom
    assert 'href="latent_0.html"' in dom and "capitalised city names" in dom
    page = _chromium(["--dump-dom", (site / "latent_0.html").as_uri()], tmp_path / "profile")
    assert "rgba(255,120,0,1.00)" in page and "Paris" in page
    shot = tmp_path / "latent_0.png"
    _chromium([f"--screenshot={shot}", "--window-size=1000,700", (site / "latent_0.html").as_uri()], tmp_path / "profile")
    assert shot.exists() and shot.stat().st_size > 5000


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_hostile_text_stays_text_in_the_browser(filled_db: Path, tmp_path: Path) -> None:
    """<!--<script>, </script> and markup in explanations or tokens neither blank the index nor add elements."""
    import html

    from explainer.ui import visible
    from tests.test_display_safety import HOSTILE, TOKENS, add_hostile_rows

    add_hostile_rows(filled_db)
    site = tmp_path / "site"
    assert main(["browse", "--db", str(filled_db), "--out", str(site), "--json"]) == 0
    dom = _chromium(["--dump-dom", (site / "index.html").as_uri()], tmp_path / "profile")
    n = 3 + len(HOSTILE)
    assert f"{n} latents" in dom and dom.count('href="latent_') == n
    assert dom.count("<script") == 2  # the data and the page's own script: nothing injected
    for text in HOSTILE:
        assert html.escape(visible(text), quote=False) in dom, text
    page = _chromium(["--dump-dom", (site / "latent_10.html").as_uri()], tmp_path / "profile")
    assert "&lt;!--&lt;script&gt;" in page and "<script" not in page
    page = _chromium(["--dump-dom", (site / "latent_0.html").as_uri()], tmp_path / "profile")
    for tok in TOKENS:
        assert html.escape(visible(tok), quote=False) in page, tok
