"""A headless Chromium for the web console's browser tests: Debian's chromium, driven by Selenium.

Why Selenium with Debian's chromedriver (packages `chromium` and `chromium-driver`, installed by
`beam-dev fetch`): both come from the same Debian source package, so the driver's version always
matches the browser's, and apt upgrades them together. Nothing is downloaded at test time: the
browser and the driver are given to Selenium by path, so Selenium Manager (which would fetch a
Chrome for Testing and a matching driver from the internet) never runs; SE_OFFLINE=true makes
sure it would not go online if it ever did. Playwright, by contrast, ships browsers of its own
that it downloads.

Nothing the browser sends leaves the machine: the flags below (QUIET_FLAGS) turn off Chromium's
background traffic (component and Safe Browsing updates, sync, translation, optimization hints,
the media router, metrics uploads, the network clock); the few requests Chromium still makes at
every start (an on-demand component fetch, the account reconciler, a prewarm of the default
search engine's page) are pointed at a closed port on 127.0.0.1 instead. What a page itself
requests is up to the page: the console serves its scripts and styles from its own origin, and
its Content-Security-Policy says so.
And as a backstop, a resolver rule (RESOLVER_RULES): no host name resolves but localhost, and
no address is reachable but loopback and 10.x, where every server of the stack listens (the
node's bridge, the Services' ClusterIPs). Chromium applies the rule to IP literals too, hence the
explicit 127.* and 10.* exclusions.

    with chromium() as driver:
        driver.get(f"http://127.0.0.1:{port}/")
        ...
        assert console_errors(driver) == []
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from beam_devstack.substrate.proc import _die_with_parent

if TYPE_CHECKING:
    from selenium.webdriver import Chrome

# Debian's launcher script (it sources /etc/chromium.d/ and execs /usr/lib/chromium/chromium)
# and Debian's chromedriver, built from the same source package.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# Where Chromium's own requests that no flag turns off are sent instead: the discard port on
# this machine, where nothing listens, so they are refused at once and never leave it.
DEAD_END = "http://127.0.0.1:9/"

# Flags that stop Chromium's own network traffic: no request but the ones a page makes. Checked
# with --log-net-log on Chromium 156 (docs/console.md, "Browser tests"): with these and
# QUIET_PREFS, a session names no host but 127.0.0.1 and sends no DNS query.
RESOLVER_RULES = "MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.* , EXCLUDE 10.*"

QUIET_FLAGS = (
    "--disable-background-networking",  # update checks, GCM, variations, prefetches
    "--disable-component-update",  # the component updater's background checks
    "--disable-sync",
    "--no-first-run",  # no first-run tasks (they fetch, import, open pages)
    "--no-default-browser-check",
    "--disable-default-apps",
    # NetworkTimeServiceQuerying: the clock check against clients2.google.com/time
    "--disable-features=Translate,OptimizationHints,MediaRouter,NetworkTimeServiceQuerying",
    "--metrics-recording-only",  # record metrics (nothing reads them), never upload them
    "--safebrowsing-disable-auto-update",
    # Left on by the flags above, at every start: an on-demand component fetch (the Optimization
    # Guide's on-device model manifest, update.googleapis.com) and the account reconciler's
    # ListAccounts (accounts.google.com). Both are sent to the dead end instead.
    f"--component-updater=url-source={DEAD_END}",
    f"--gaia-url={DEAD_END}",
)

# Debian's default search engine is DuckDuckGo, and Chromium preconnects to and prewarms its
# start page (start.duckduckgo.com) at every start: the default search engine is the dead end.
QUIET_PREFS: dict[str, object] = {
    "default_search_provider_data": {
        "template_url_data": {"keyword": "local", "short_name": "local", "url": DEAD_END + "?q={searchTerms}"}
    },
}


class BrowserMissing(RuntimeError):
    pass


def _require(path: Path) -> str:
    if not path.is_file():
        raise BrowserMissing(
            f"{path} not found: the browser tests need Debian's chromium and chromedriver; "
            "run `beam-dev fetch`, or `apt-get install chromium chromium-driver`"
        )
    return str(path)


@contextlib.contextmanager
def chromium(*, width: int = 1366, height: int = 900, downloads: Path | None = None) -> Iterator[Chrome]:
    """A headless Chromium under chromedriver with a fresh profile; quit and removed on exit.

    downloads: the folder files are downloaded into (created), without asking.
    The browser's console is captured: console_errors(driver) returns its errors.
    """
    browser, driver_path = _require(CHROMIUM), _require(CHROMEDRIVER)
    # Selenium Manager must never go online, should anything ever call it.
    os.environ["SE_OFFLINE"] = "true"
    os.environ["SE_AVOID_STATS"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(tempfile.mkdtemp(prefix="beam-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    options.add_argument("--headless=new")
    # As root (this machine, CI containers) Chromium refuses to start with its sandbox.
    options.add_argument("--no-sandbox")
    # /dev/shm is small in containers; Chromium's shared memory goes to /tmp instead.
    options.add_argument("--disable-dev-shm-usage")
    # chromedriver talks to Chromium over a pipe, not a DevTools port on 127.0.0.1: no port any
    # other local process could use, and Chromium exits when the pipe closes, that is when
    # chromedriver dies (with a TCP port it would outlive a killed test run).
    options.add_argument("--remote-debugging-pipe")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    for flag in QUIET_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--host-resolver-rules={RESOLVER_RULES}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    prefs = dict(QUIET_PREFS)
    if downloads is not None:
        downloads.mkdir(parents=True, exist_ok=True)
        prefs["download.default_directory"] = str(downloads.resolve())
        prefs["download.prompt_for_download"] = False
    options.add_experimental_option("prefs", prefs)
    service = Service(
        executable_path=driver_path,
        # Chromium's crash database (~/.config/chromium/Crash Reports) goes into the profile too,
        # so nothing is left in the home directory; chromedriver passes its environment on.
        env={**os.environ, "SE_OFFLINE": "true", "CHROME_CONFIG_HOME": str(profile)},
        # chromedriver dies with the test process even when that one is killed with SIGKILL, as
        # every server beam_devstack.substrate.proc starts; Chromium follows it
        # (--remote-debugging-pipe).
        popen_kw={"preexec_fn": _die_with_parent},
    )
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=service)
        yield driver
    finally:
        try:
            if driver is not None:
                driver.quit()
            elif getattr(service, "process", None) is not None:
                service.stop()  # chromedriver started, the session did not
        finally:
            _kill_leftovers(profile)
            shutil.rmtree(profile, ignore_errors=True)


def _kill_leftovers(profile: Path) -> None:
    """SIGKILL any process of this browser still running after quit: each names the profile
    folder on its command line (--user-data-dir, the crash handler's database in it). What
    remains after that are zombies, which this machine's init reaps within a couple of seconds."""
    needle = str(profile).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass


def console_errors(driver: Chrome) -> list[str]:
    """The browser console's SEVERE entries since the last call (the log is read and emptied):
    uncaught exceptions, console.error(), failed loads and Content-Security-Policy violations."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def save_screenshot(driver: Chrome, path: Path) -> Path:
    """A PNG of the viewport at `path` (its folder created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(driver.get_screenshot_as_png())
    return path
