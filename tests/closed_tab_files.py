"""A closed tab's files leave the server once its session can no longer reconnect. Run by
tests/test_session_storage.py in a process of its own (Playwright starts once per process);
prints what it saw and exits 0 when every step held.

The app runs with a 2 s session TTL (`server.disconnectedSessionTTL`) and its sweeper every
second. A tab analyses a text and downloads its trace file through the page's "Download trace
file" button (the file is served from the server's memory at a /media URL); then the tab
closes. Streamlit alone would keep that file for good (it never shuts down an expired stored
session); with `moeviz.session_storage` the URL must answer 404 within 30 s.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from browser import AppPage, chromium, running_app

from moeviz.trace import RoutingTrace

TEXT = "A closed tab leaves nothing behind: its trace file goes once its session has ended."
TTL_SECONDS, SWEEP_SECONDS, WAIT_SECONDS = 2, 1, 30


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        env = os.environ | {"MOEVIZ_CACHE_SWEEP_SECONDS": str(SWEEP_SECONDS)}
        with running_app(Path(scratch) / "server.log", env,
                         options=("--server.disconnectedSessionTTL", str(TTL_SECONDS))) as url, \
                chromium(Path(scratch) / "profile") as browser:
            tab = AppPage(browser.new_page(), url).open()
            tab.enter_text("analyse_text", TEXT)
            with tab.page.expect_download() as download:
                tab.page.get_by_role("button", name="Download trace file").click()
            file_url = download.value.url
            trace = RoutingTrace.from_bytes(Path(download.value.path()).read_bytes())
            assert trace.text == TEXT, trace.text
            assert status(file_url) == 200
            print(f"downloaded {file_url.rsplit('/', 1)[-1]} ({trace.num_tokens} tokens); it answers 200 while the tab is open")
            tab.page.close()
            closed = time.monotonic()
            while status(file_url) != 404:
                if time.monotonic() - closed > WAIT_SECONDS:
                    print(f"the file still answers {status(file_url)} {WAIT_SECONDS} s after the tab closed")
                    return 1
                time.sleep(0.5)
            print(f"the file answers 404 {time.monotonic() - closed:.1f} s after the tab closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
