"""The browser renders in a real headless Chromium, served and static: rows come from its JavaScript,
and hostile text in explanations and tokens stays text (no script runs, nothing is added)."""

from __future__ import annotations

import html
import shutil
import subprocess
from pathlib import Path

import pytest

from explainer.cli import main
from explainer.ui import visible
from tests.test_browse_server import HOSTILE_EXTRA, PWNED, Served, add_page_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000"]  # lets the pages' script loads and fetches finish before the dump
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")


def _chromium(args: list[str], profile: Path) -> str:
    res = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                         capture_output=True, text=True, timeout=120)
    return res.stdout


def _dom(url: str, tmp: Path) -> str:
    return _chromium(["--dump-dom", url], tmp / "profile")


def _shown(dom: str) -> str:
    """What the page's script rendered: the body up to the config data (the scripts' own text follows it)."""
    return dom.split("<body>", 1)[1].split('<script id="config"', 1)[0]


def _shot(url: str, png: Path, tmp: Path, height: int = 1400) -> None:
    _chromium([f"--screenshot={png}", f"--window-size=1100,{height}", url], tmp / "profile")
    assert png.exists() and png.stat().st_size > 5000


def _literal(text: str) -> str:
    return html.escape(visible(text), quote=False)


@needs_chromium
def test_static_site_renders_in_headless_chromium(filled_db: Path, tmp_path: Path) -> None:
    add_page_rows(filled_db)
    site = tmp_path / "site"
    assert main(["browse", "--db", str(filled_db), "--out", str(site), "--json"]) == 0
    dom = _dom((site / "index.html").as_uri(), tmp_path)
    # The table body is filled by the page's script from data/index_0.js, so these prove the JavaScript ran.
    assert "8 latents" in dom and 'href="latent.html#0"' in dom and "capitalised city names" in dom
    assert "<svg" in dom and "<rect" in dom  # the overview plot
    dom = _dom((site / "latent.html").as_uri() + "#0", tmp_path)
    page = _shown(dom)
    assert "<title>Latent 0</title>" in dom and "rgba(255,120,0,1.00)" in page and "Paris" in page
    assert 'href="latent.html#1"' in page and "decoder_cosine" in page  # neighbours as links
    _shot((site / "latent.html").as_uri() + "#0", tmp_path / "static_latent_0.png", tmp_path)


@needs_chromium
def test_served_pages_render_in_headless_chromium(filled_db: Path, tmp_path: Path) -> None:
    add_page_rows(filled_db)
    s = Served(filled_db)
    try:
        dom = _dom(s.base + "/", tmp_path)
        assert "8 latents" in dom and 'href="latent/0"' in dom and "capitalised city names" in dom
        page = _shown(_dom(s.base + "/latent/0", tmp_path))
        assert "Activation histogram" in page and "per-token activations" in page
        assert "Logit lens" in page and " Paris" in page and 'href="1"' in page
        assert "simulation/json" in page and "no logit-lens" not in page
        page1 = _shown(_dom(s.base + "/latent/1", tmp_path))
        assert "no logit-lens rows for this latent" in page1 and "no neighbours stored for this latent" in page1
        _shot(s.base + "/", tmp_path / "served_index.png", tmp_path, 1000)
        _shot(s.base + "/latent/0", tmp_path / "served_latent_0.png", tmp_path)
    finally:
        s.close()


@needs_chromium
def test_hostile_text_stays_text_served_and_static(filled_db: Path, tmp_path: Path) -> None:
    """<!--<script>, </script>, onerror handlers, markup, RTL marks and very long strings in explanations
    and tokens neither run, nor add elements, nor blank a page; each is shown as written."""
    from tests.test_display_safety import HOSTILE, TOKENS, add_hostile_rows

    add_hostile_rows(filled_db)
    add_page_rows(filled_db)
    site = tmp_path / "site"
    assert main(["browse", "--db", str(filled_db), "--out", str(site), "--json"]) == 0
    n = 3 + len(HOSTILE) + len(HOSTILE_EXTRA)
    s = Served(filled_db)
    try:
        pages = {
            "served index": (_dom(s.base + "/?", tmp_path), 3),
            "static index": (_dom((site / "index.html").as_uri(), tmp_path), 4),
        }
        for name, (dom, scripts) in pages.items():
            assert f"{n} latents" in dom, name
            assert dom.count("<script") == scripts and "<img" not in dom and PWNED not in dom.split("</title>")[0], name
            for text in HOSTILE + HOSTILE_EXTRA:  # the index cuts a label at 300 characters
                assert _literal(visible(text)[:300]) in _shown(dom), (name, text)
        tokens_of_latent_0 = TOKENS + [HOSTILE_EXTRA[0], "\u202e[bold]", "x" * 500] + ["t" * 300, HOSTILE_EXTRA[1]]
        for latent, texts in [(0, tokens_of_latent_0),
                              (10, [HOSTILE[7]]), (21, [HOSTILE_EXTRA[1]]), (20, [HOSTILE_EXTRA[0]]),
                              (24, [HOSTILE_EXTRA[4]]), (13, [HOSTILE[-1]])]:
            for name, url in [("served", f"{s.base}/latent/{latent}"), ("static", f"{(site / 'latent.html').as_uri()}#{latent}")]:
                dom = _dom(url, tmp_path)
                assert f"<title>Latent {latent}</title>" in dom, (name, latent)  # rendered, and no payload retitled it
                assert dom.count("<script") == 4 and "<img" not in dom, (name, latent)
                for text in texts:
                    assert _literal(text) in _shown(dom), (name, latent, text)
        _shot(f"{s.base}/latent/0", tmp_path / "hostile_latent_0.png", tmp_path)
    finally:
        s.close()
