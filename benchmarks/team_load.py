"""Many people on one team-mode server: sign-in, then rounds of "paste a text, wait for the page".

The app runs in team mode (`streamlit run app.py` on 127.0.0.1, a shared token, the bundled
model as the only allowed model) and Debian's Chromium opens `--sessions` tabs, each its own
browser session. Each tab signs in, then every round all tabs send a new text at once (so the
server really has that many forward passes to queue) and each waits until its page has drawn
the result. Every tab gets texts of its own length, so a session shown another's routing would
show a wrong token count: each count is checked against `trace_text` run in this process.
Recorded: p50/p95 of the time from Ctrl+Enter to the page settled, errors, and the server's
resident memory (VmRSS) after sign-in (warm: the model loaded, one text traced per tab), at the
end of the rounds, 15 s after the tabs close, and once their sessions have ended (Streamlit keeps a
closed tab's session for `--session-ttl` seconds, `server.disconnectedSessionTTL`, 120 by
default) and the cache's sweeper (every 5 s here) has dropped their traces: it must then be
back within 10% of the warm figure.

Bounded: at most 32 sessions and 600 s; loopback only.

    .venv/bin/python benchmarks/team_load.py [--sessions 8] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the browser machinery of the e2e tests

from browser import AppPage, chromium, running_app

from moeviz.model.capture import DEFAULT_MAX_TOKENS, trace_text
from moeviz.model.loading import BUNDLED_MODEL, load_model
from moeviz.model.tokens import context_length

TOKEN = "load-test-token"
SWEEP_SECONDS = 5
RSS_TOLERANCE = 0.10
SAMPLES = ROOT / "assets" / "samples"
MAX_SESSIONS, MAX_SECONDS = 32, 600


def server_rss(port: str) -> int:
    """VmRSS in bytes of the Streamlit process serving `port` (found by its command line)."""
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"streamlit" in command and port.encode() in command:
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError(f"no streamlit process serving port {port}")


def texts_for(session: int, round_: int, corpus: str) -> str:
    """A window of the held-out samples of a length only this session uses."""
    start = (round_ * 977 + session * 131) % (len(corpus) - 2000)
    return corpus[start:start + 300 + 29 * session]


def sign_in(tab: AppPage) -> None:
    tab.open()
    tab.page.locator(".st-key-team_access_token input").fill(TOKEN)
    tab.act(lambda: tab.page.get_by_role("button", name="Sign in").click())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--session-ttl", type=int, default=120,
                        help="seconds Streamlit keeps a closed tab's session (server.disconnectedSessionTTL)")
    args = parser.parse_args()
    if not 1 <= args.sessions <= MAX_SESSIONS or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--sessions must be 1-{MAX_SESSIONS} and --seconds at most {MAX_SECONDS}")
    corpus = "\n".join(path.read_text(encoding="utf-8") for path in sorted(SAMPLES.glob("*.txt")))
    model = load_model(str(BUNDLED_MODEL))
    limit = min(DEFAULT_MAX_TOKENS, context_length(model.model.config))  # the sidebar's default
    env = os.environ | {"MOEVIZ_TEAM": "1", "MOEVIZ_ACCESS_TOKEN": TOKEN, "MOEVIZ_MODELS": f"bundled={BUNDLED_MODEL}",
                        "MOEVIZ_CACHE_SWEEP_SECONDS": str(SWEEP_SECONDS)}
    latencies, errors, wrong, rss = [], [], 0, {}
    with tempfile.TemporaryDirectory() as scratch, running_app(Path(scratch) / "server.log", env,
                                                                   options=("--server.disconnectedSessionTTL",
                                                                            str(args.session_ttl))) as url:
        port = url.rsplit(":", 1)[1]
        with chromium(Path(scratch) / "profile") as browser:
            tabs = [AppPage(browser.new_page(), url) for _ in range(args.sessions)]
            for tab in tabs:
                sign_in(tab)
            rss["signed in"] = server_rss(port)
            end, round_ = time.monotonic() + args.seconds, 0
            while time.monotonic() < end:
                sent = []
                for session, tab in enumerate(tabs):
                    text = texts_for(session, round_, corpus)
                    before = tab.finished
                    tab.start_typing("analyse_text", text)
                    tab.send("analyse_text")
                    sent.append((time.monotonic(), before, text))
                for tab, (start, before, text) in zip(tabs, sent):
                    try:
                        latencies.append(tab.wait_for_run(before) - start)
                    except Exception as error:  # noqa: BLE001 - counted and reported, the run goes on
                        errors.append(f"{type(error).__name__}: {error}")
                        continue
                    trace = trace_text(model.model, model.tokenizer, text, max_tokens=limit)
                    expected = trace.num_tokens - int(trace.special.sum())
                    wrong += tab.token_counts()[:1] != [expected]
                round_ += 1
            rss["after the rounds"] = server_rss(port)
            errors += [e for tab in tabs for e in tab.errors]
            for tab in tabs:
                tab.page.close()
        time.sleep(3 * SWEEP_SECONDS)
        rss[f"{3 * SWEEP_SECONDS} s after the tabs closed"] = server_rss(port)
        time.sleep(args.session_ttl)  # then 3 sweeps after the sessions' end
        rss[f"{args.session_ttl + 3 * SWEEP_SECONDS} s after (the sessions ended)"] = server_rss(port)
    actions = len(latencies)
    print(f"{args.sessions} sessions, {round_} rounds, {actions} page runs in {args.seconds:.0f} s; "
          f"errors {len(errors)}; wrong token counts {wrong}")
    if latencies:
        p95 = statistics.quantiles(latencies, n=20)[-1] if actions >= 2 else latencies[0]
        print(f"send -> page settled: p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s")
    for moment, value in rss.items():
        print(f"server RSS {moment}: {value / 2**20:.0f} MiB")
    warm, last = rss["signed in"], list(rss.values())[-1]
    returned = last <= warm * (1 + RSS_TOLERANCE)
    print(f"RSS after the sessions ended: {last / warm - 1:+.1%} of the warm figure "
          f"({'within' if returned else 'NOT within'} {RSS_TOLERANCE:.0%})")
    for error in errors[:5]:
        print("error:", error)
    return 1 if errors or wrong or not returned else 0


if __name__ == "__main__":
    sys.exit(main())
