"""The browser substrate of the console's tests: Debian's headless Chromium under Selenium
(beam_devstack.substrate.browser, the `browser` fixture) runs a page's own script, honours its
Content-Security-Policy, reports the violation in its console, and takes screenshots.

The page is served by a tiny http.server on 127.0.0.1, as the console will be: a labelled form
whose submit handler lives in an external script (/app.js), and one inline script that the
policy must block.
"""

from __future__ import annotations

import http.server
import threading

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from beam_devstack.substrate.browser import console_errors, save_screenshot

CSP = "default-src 'self'; script-src 'self'"
TITLE = "substrate"

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{TITLE}</title>
<script src="/app.js" defer></script>
</head>
<body>
<form id="form">
  <label for="message">Message</label>
  <input id="message" name="message" type="text" autocomplete="off">
  <button type="submit">Show</button>
</form>
<p id="out"></p>
<script>document.title = "inline ran";</script>
</body>
</html>
"""

# textContent, never innerHTML: what the user typed is shown as text, not parsed as markup.
APP_JS = """document.getElementById("form").addEventListener("submit", (event) => {
  event.preventDefault();
  document.getElementById("out").textContent = document.getElementById("message").value;
});
document.body.dataset.ready = "1";
"""

ROUTES = {"/": ("text/html; charset=utf-8", PAGE), "/app.js": ("text/javascript; charset=utf-8", APP_JS)}


class _Handler(http.server.BaseHTTPRequestHandler):
    served: list[str]

    def do_GET(self):
        self.served.append(self.path)
        if self.path not in ROUTES:
            self.send_error(404)
            return
        content_type, text = ROUTES[self.path]
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def site():
    """(url, paths requested): the page on a free 127.0.0.1 port, served from a thread."""
    served: list[str] = []
    handler = type("Handler", (_Handler,), {"served": served})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="substrate-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_browser_runs_the_pages_own_script_blocks_inline_script_and_takes_screenshots(browser, site, tmp_path):
    url, served = site
    wait = WebDriverWait(browser, 15)
    browser.get(url)
    # The external script has run (and the submit handler is attached) before anything is typed.
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", "/app.js never ran")
    assert "/app.js" in served

    field = browser.find_element(By.ID, "message")
    assert field.accessible_name == "Message"
    typed = "hello <b>x</b>"
    field.send_keys(typed)
    browser.find_element(By.XPATH, "//button[normalize-space()='Show']").click()

    out = browser.find_element(By.ID, "out")
    wait.until(lambda d: out.text == typed, f"#out never showed {typed!r} as text")
    # Shown as text: the markup is escaped, no element was created, nothing is bold.
    assert out.find_elements(By.TAG_NAME, "b") == []
    assert out.get_property("innerHTML") == "hello &lt;b&gt;x&lt;/b&gt;"
    assert out.value_of_css_property("font-weight") == "400"
    # The form did not navigate (the handler prevented it): still the one page, no query.
    assert browser.current_url == url

    # The inline script was blocked by the policy, and the console says so.
    assert browser.title == TITLE
    errors: list[str] = []
    wait.until(
        lambda d: errors.extend(console_errors(d)) or any("Content Security Policy" in e for e in errors),
        "no Content-Security-Policy violation in the console",
    )
    violation = next(e for e in errors if "Content Security Policy" in e)
    assert "inline script" in violation and "script-src 'self'" in violation, errors

    shot = save_screenshot(browser, tmp_path / "screenshots" / "form.png")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 1000
