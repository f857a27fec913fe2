"""The built HTML book works offline in a real browser (headless Chromium).

For every page in _toc.yml, opened from disk (file:// URLs): the equations are typeset by the vendored
MathJax (no raw TeX left, no TeX errors), every image loads, every ipywidget is rendered by the vendored
embed manager and its slider drives the picture, nothing is fetched from the network, and the console
shows no errors. A plain-Python check follows every relative link of every built page. Screenshots of the
pages and of their first widget go to ci-artifacts/screenshots/ (kept by CI).

The browser is driven with Selenium through Debian's chromedriver (same package version as Debian's
chromium, so they always match, and nothing is downloaded: Selenium Manager is not needed when the
driver's path is given). Playwright would need its own browser build, or a CDP connection to a Chromium
whose version it does not pin.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("GENLIB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GENLIB_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = ROOT / "ci-artifacts" / "screenshots"
# Without the networking flags Chromium hangs on a machine with a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,2000"]



def toc_pages() -> list[str]:
    toc = (ROOT / "_toc.yml").read_text()
    return re.findall(r"^\s*(?:root|-\s*file):\s*(\S+)", toc, re.MULTILINE)


PAGES = toc_pages()


HAVE_CHROMIUM = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
NO_CHROMIUM = (f"headless Chromium not installed ({CHROMIUM}, {CHROMEDRIVER}); "
               "tools/setup_env.sh installs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def browser():
    if not HAVE_CHROMIUM:
        pytest.skip(NO_CHROMIUM)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile.name}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()
    profile.cleanup()


# JavaScript run in the page (execute_async_script: the last argument is the callback).
WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1], start = Date.now();
(function poll() {
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) {
    mj.startup.promise.then(() => done("ok"), (err) => done("MathJax startup failed: " + err));
  } else if (Date.now() - start > 30000) {
    done("MathJax did not start within 30 s");
  } else { setTimeout(poll, 50); }
})();
"""

WAIT_FOR_WIDGETS = """
const done = arguments[arguments.length - 1], start = Date.now();
const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
(function poll() {
  const rendered = Array.from(document.querySelectorAll(".widget-subarea"))
    .filter((area) => area.querySelector(".jupyter-widgets")).length;
  if (rendered >= views || Date.now() - start > 30000) {
    done({views: views, rendered: rendered, sliders: document.querySelectorAll(".widget-slider").length,
          errors: document.body.innerText.includes("Error displaying widget")});
  } else { setTimeout(poll, 50); }
})();
"""

WAIT_FOR_IMAGES = """
const done = arguments[arguments.length - 1], start = Date.now();
(function poll() {
  const images = Array.from(document.images);
  if (images.every((img) => img.complete) || Date.now() - start > 20000) {
    done(images.filter((img) => !(img.complete && img.naturalWidth > 0))
               .map((img) => img.getAttribute("src").slice(0, 120)));
  } else { setTimeout(poll, 50); }
})();
"""

# The article's visible text without code, outputs and typeset math: TeX left here was not typeset.
ARTICLE_TEXT = """
const article = document.querySelector("article") || document.body;
const copy = article.cloneNode(true);
copy.querySelectorAll("pre, code, script, style, textarea, mjx-container, .highlight").forEach((e) => e.remove());
return copy.textContent;
"""

MATH_STATE = """
return {containers: document.querySelectorAll("mjx-container").length,
        texErrors: Array.from(document.querySelectorAll("mjx-merror")).map((e) => e.textContent).slice(0, 5),
        mathNodes: document.querySelectorAll(".math, .amsmath").length,
        mathjaxLoaded: Boolean(window.MathJax && window.MathJax.startup)};
"""

# Everything the page loaded: all of it must come from disk (or data:/blob: URLs), none from a network.
LOADED_RESOURCES = "return performance.getEntriesByType('resource').map((e) => e.name);"


def slider_moves_picture(driver) -> str | None:
    """Press the right arrow on the first slider: its readout and its widget's picture must change
    (frame_slider links them in the browser, no kernel)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    state = """const box = document.querySelector(".widget-subarea .noUi-handle").closest(".widget-subarea");
               const img = box.querySelector("img.widget-image");
               return [box.querySelector(".widget-readout").textContent, img ? img.src : null];"""
    before = driver.execute_script(state)
    handle = driver.find_element(By.CSS_SELECTOR, ".widget-subarea .noUi-handle")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
    handle.send_keys(Keys.ARROW_RIGHT)
    deadline = time.monotonic() + 5
    while True:  # the picture follows through the jslink, asynchronously
        after = driver.execute_script(state)
        if after[0] != before[0] and (after[1] is None or after[1] != before[1]):
            return None
        if time.monotonic() > deadline:
            return (f"moving the slider did not change the widget (readout {before[0]!r} -> {after[0]!r}, "
                    f"picture changed: {after[1] != before[1]})")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)  # (decided before the book is built)
@pytest.mark.parametrize("page", PAGES)
def test_page_renders_offline(page, built_book, browser):
    html = Path(built_book)
    path = html / f"{page}.html"
    assert path.exists(), f"{page}.html was not built"
    source = path.read_text(encoding="utf-8")
    problems: list[str] = []

    # Static check: the page loads no script from a CDN, and its inline scripts name none (except
    # sphinx-thebe's THEBE_JS_URL, fetched only on a "live code" click, which this book does not offer).
    for src in re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", source):
        if re.match(r"(https?:)?//", src):
            problems.append(f"script loaded from the network: {src}")
    for body in re.findall(r"<script[^>]*>(.*?)</script>", source, re.DOTALL):
        body = re.sub(r'const THEBE_JS_URL = "https://unpkg\.com/thebe@[^"]*"', "", body)
        for cdn in re.findall(r"(?:cdn\.jsdelivr\.net|cdnjs\.cloudflare\.com|unpkg\.com|mathjax\.org)[^\s\"']*", body):
            problems.append(f"inline script names a CDN: {cdn[:100]}")

    browser.get_log("browser")  # drop what the previous page left
    browser.get(path.as_uri())

    # Math: wait for MathJax's startup promise (the initial typeset), then look at the result.
    if "tex-chtml.js" in source:
        status = browser.execute_async_script(WAIT_FOR_MATHJAX)
        if status != "ok":
            problems.append(status)
    math = browser.execute_script(MATH_STATE)
    if math["mathNodes"] and not math["mathjaxLoaded"]:
        problems.append(f"{math['mathNodes']} math elements but MathJax is not loaded")
    if math["mathNodes"] and not math["containers"]:
        problems.append("no equation was typeset (no mjx-container)")
    if math["texErrors"]:
        problems.append(f"TeX errors in typeset equations: {math['texErrors']}")
    text = browser.execute_script(ARTICLE_TEXT)
    for raw in ("$$", r"\(", r"\[", r"\begin{"):
        if raw in text:
            at = text.index(raw)
            problems.append(f"raw TeX {raw!r} left in the text: ...{text[max(0, at - 60):at + 60]!r}...")

    # Widgets: the embed manager renders every widget view; chapters have at least one, and it works.
    widgets = browser.execute_async_script(WAIT_FOR_WIDGETS)
    if widgets["rendered"] < widgets["views"] or widgets["errors"]:
        problems.append(f"widgets not rendered: {widgets}")
    if page.startswith("chapters/") and widgets["rendered"] < 1:
        problems.append(f"no rendered widget in {page} (every chapter has an interactive widget)")
    if widgets["sliders"]:
        moved = slider_moves_picture(browser)
        if moved:
            problems.append(moved)

    # Images: every <img> (figures, and the widgets' pictures) loaded.
    broken = browser.execute_async_script(WAIT_FOR_IMAGES)
    if broken:
        problems.append(f"{len(broken)} images did not load: {broken[:5]}")

    # Offline: everything came from disk.
    remote = [url for url in browser.execute_script(LOADED_RESOURCES)
              if not url.startswith(("file:", "data:", "blob:"))]
    if remote:
        problems.append(f"fetched from the network: {remote[:5]}")

    # Console: no errors at all, from our pages, the theme's or the vendored scripts (warnings are allowed).
    # (Sphinx 7.4 wrote sphinx-thebe's inline `const THEBE_JS_URL` twice, a redeclaration error on every page;
    # book/_ext/dedupe_inline_scripts.py writes each script once.)
    for entry in browser.get_log("browser"):
        if entry["level"] == "SEVERE":
            problems.append(f"console error: {entry['message'][:300]}")

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0);")
    name = page.replace("/", "__")
    browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))  # the top of the page (1280 x ~1860 px)
    if widgets["rendered"]:  # and the first widget, after its slider moved one step
        from selenium.webdriver.common.by import By
        widget = browser.find_element(By.CSS_SELECTOR, ".widget-subarea")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", widget)
        widget.screenshot(str(SCREENSHOTS / f"{name}__widget.png"))

    assert not problems, f"{page}:\n  " + "\n  ".join(problems)


class _LinkParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if attrs.get(key):
                self.ids.add(attrs[key])
        for key in ("href", "src"):
            if attrs.get(key) is not None:
                self.links.append(attrs[key])


@pytest.mark.slow
def test_no_broken_internal_links(built_book):
    """Every relative href/src of every built page points to a file that exists, and a #fragment into a
    built page to an element id in it."""
    html = Path(built_book).resolve()
    pages = [p for p in html.rglob("*.html") if not p.relative_to(html).parts[0] in ("_static", "_sources")]
    parsed: dict[Path, _LinkParser] = {}

    def parse(path: Path) -> _LinkParser:
        if path not in parsed:
            parser = _LinkParser()
            parser.feed(path.read_text(encoding="utf-8", errors="replace"))
            parsed[path] = parser
        return parsed[path]

    broken: list[str] = []
    for page in pages:
        for link in parse(page).links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith("//"):
                continue  # absolute URLs (repository, Colab, references) are not ours to check offline
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(html)}: {link}"
            if not target.exists():
                broken.append(f"{where} (no such file)")
            elif parts.fragment and target.suffix == ".html" and html in target.parents:
                if unquote(parts.fragment) not in parse(target).ids:
                    broken.append(f"{where} (no element with id {parts.fragment!r})")
    assert pages, f"no HTML pages under {html}"
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken[:40])


def test_vendored_javascript_is_configured():
    """_config.yml serves MathJax and the widget scripts from the vendored copies (no CDN)."""
    config = (ROOT / "_config.yml").read_text()
    assert "mathjax_path: vendor/mathjax/tex-chtml.js" in config
    assert "vendor/html-manager/embed-amd.js" in config and "vendor/requirejs/require.js" in config
    lock = json.loads((ROOT / "tools" / "js" / "package-lock.json").read_text())
    versions = {name.split("node_modules/")[-1]: info["version"] for name, info in lock["packages"].items() if name}
    assert versions["mathjax"] == "3.2.2"
    assert versions["@jupyter-widgets/html-manager"] == "1.0.15"
