"""How long the app makes a person wait, on this machine and the default model.

1. Server side, in Streamlit's own script runner (AppTest, no browser): each round moves the
   Analyse page's layer slider (the trace comes from `st.cache_data`) and, interleaved,
   analyses a new text of the same length (the model runs). Ratio: slider / new text.
2. In the real app (`streamlit run` + Debian's Chromium): each round analyses a new text of
   `--tokens` tokens (Ctrl+Enter until every chart is drawn), then moves the layer slider;
   interleaved with `trace_text` on the same new text in this process once the browser is
   idle: the model's share. Browser, server and this process share the machine's cores.
   The server's time per run is measured twice: inside the server (a `sitecustomize` in the
   server's PYTHONPATH times `ScriptRunner._run_script`), and as the websocket shows it
   (first message of the run to `script_finished`, received by the browser).

3. `--view`: a layer switch inside the Analyse page's routing view (`moeviz.views.routing_view`,
   no server round trip) against a move of the page's own layer slider (a rerun of the charts'
   `st.fragment`), interleaved, on a text of each `--view-tokens` length (the sidebar's token
   limit raised to fit). The view's switch is timed twice: in the page, from the key event's
   timestamp to a task queued after the next animation frame (the new layer painted), and from
   here, key press to the view reporting it (adds Playwright's round trips).

Every text is a different window of the held-out samples, so no run hits the trace cache.

    .venv/bin/python benchmarks/app_timing.py [--rounds 15] [--tokens 1000]
    .venv/bin/python benchmarks/app_timing.py --view [--rounds 9] [--view-tokens 1000 8192]
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

from browser import AppPage, chromium, running_app  # noqa: E402
from capture_overhead import SAMPLES  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from moeviz.model.capture import trace_text  # noqa: E402
from moeviz.model.loading import load_model  # noqa: E402
from moeviz.ui import default_model_source  # noqa: E402


def windows(tokenizer, tokens: int, count: int) -> list[str]:
    """`count` different texts of about `tokens` tokens: successive windows of the samples."""
    corpus = "\n".join(path.read_text(encoding="utf-8") for path in sorted(SAMPLES.glob("*.txt")))
    offsets = tokenizer(corpus, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    step = max(1, (len(offsets) - tokens) // count)
    if len(offsets) < tokens + count:
        corpus = corpus * (1 + (tokens + count * step) // len(offsets))
        offsets = tokenizer(corpus, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    texts = []
    for number in range(count):
        start = number * step
        texts.append(corpus[offsets[start][0] : offsets[start + tokens - 1][1]])
    return texts


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:,.0f}"


def paired(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def server_side(texts: list[str], rounds: int) -> None:
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    app.run()
    app.text_area(key="analyse_text").set_value(texts[0]).run()
    layers = app.select_slider[0].options
    slider, fresh = [], []
    for number in range(rounds):
        start = time.perf_counter()
        app.select_slider[0].set_value(layers[-1] if number % 2 == 0 else layers[0]).run()
        slider.append(time.perf_counter() - start)
        start = time.perf_counter()
        app.text_area(key="analyse_text").set_value(texts[number + 1]).run()
        fresh.append(time.perf_counter() - start)
        assert not app.exception, [e.message for e in app.exception]
    print("| server side (AppTest) | median (ms) |\n|---|---:|")
    print(f"| rerun after a slider move, trace cached | {median_ms(slider)} |")
    print(f"| rerun with a new text (model runs) | {median_ms(fresh)} |")
    print(f"| ratio slider / new text | {paired(slider, fresh):.3f} |\n", flush=True)


# Loaded by the server process only: prints how long each script run takes inside it.
SCRIPT_TIMER = """
import sys, time
from streamlit.runtime.scriptrunner import script_runner

_run_script = script_runner.ScriptRunner._run_script


def _timed(self, *args, **kwargs):
    start = time.perf_counter()
    try:
        return _run_script(self, *args, **kwargs)
    finally:
        print(f"moeviz-script-run {time.perf_counter() - start:.4f}", file=sys.stderr, flush=True)


script_runner.ScriptRunner._run_script = _timed
"""


def in_browser(loaded, texts: list[str], rounds: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "sitecustomize.py").write_text(SCRIPT_TIMER)
        log = Path(scratch) / "server.log"
        env = os.environ | {"PYTHONPATH": os.pathsep.join([scratch, str(ROOT)])}
        with running_app(log, env) as url, chromium(Path(scratch) / "profile") as browser:
            timings = browse(loaded, AppPage(browser.new_page(), url), texts, rounds)
        runs = [float(line.split()[-1]) for line in log.read_text().splitlines() if line.startswith("moeviz-script-run")]
    analyse, analyse_server, model_only, move, move_server, counts = timings
    inside = runs[-2 * rounds:]  # each round: a new text, then a slider move
    print(f"| in the browser, {statistics.median(counts):,.0f} tokens | median (ms) |\n|---|---:|")
    print(f"| new text: Ctrl+Enter until every chart is drawn | {median_ms(analyse)} |")
    print(f"| its script run inside the server | {median_ms(inside[0::2])} |")
    print(f"| its script run as the websocket shows it | {median_ms(analyse_server)} |")
    print(f"| trace_text alone, same text, this process | {median_ms(model_only)} |")
    print(f"| ratio end to end / trace_text | {paired(analyse, model_only):.2f} |")
    print(f"| slider move: key press until every chart is drawn | {median_ms(move)} |")
    print(f"| its script run inside the server | {median_ms(inside[1::2])} |")
    print(f"| its script run as the websocket shows it | {median_ms(move_server)} |")
    print(f"| ratio slider move / new text, end to end | {paired(move, analyse):.3f} |", flush=True)


def browse(loaded, tab: AppPage, texts: list[str], rounds: int) -> tuple[list, ...]:
    """The timed rounds on one tab: seconds, and the token counts the page showed."""
    tab.open()
    tab.enter_text("analyse_text", texts[-1])  # charts' scripts loaded, model warm
    slider = tab.page.get_by_role("slider", name="Layer")
    analyse, analyse_server, model_only, move, move_server, counts = [], [], [], [], [], []
    for number in range(rounds):
        text = texts[number]
        tab.start_typing("analyse_text", text)
        before = tab.finished
        start = time.monotonic()
        tab.send("analyse_text")
        analyse.append(tab.wait_for_run(before) - start)
        analyse_server.append(tab.runs[-1][1] - tab.runs[-1][0])
        counts.append(tab.token_counts()[0])

        tab.page.wait_for_timeout(1000)  # let Chromium finish painting: the cores are shared
        start = time.perf_counter()
        trace_text(loaded.model, loaded.tokenizer, text, model_id=loaded.model_id)
        model_only.append(time.perf_counter() - start)

        before = tab.finished
        start = time.monotonic()
        slider.press("End" if number % 2 == 0 else "Home")
        move.append(tab.wait_for_run(before) - start)
        move_server.append(tab.runs[-1][1] - tab.runs[-1][0])
        if tab.dialogs or tab.errors:
            raise RuntimeError(f"the page misbehaved: {tab.dialogs} {tab.errors}")
    return analyse, analyse_server, model_only, move, move_server, counts


def view_switches(loaded, sizes: list[int], rounds: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        with running_app(Path(scratch) / "server.log") as url, chromium(Path(scratch) / "profile") as browser:
            for tokens in sizes:
                tab = AppPage(browser.new_page(), url)
                print(view_table(tab, windows(loaded.tokenizer, tokens, 1)[0], tokens, rounds), flush=True)
                tab.page.close()


def view_table(tab: AppPage, text: str, tokens: int, rounds: int) -> str:
    tab.open()
    limit = tab.page.locator('[class*="st-key-max_tokens-"] input')
    tab.act(lambda: (limit.fill(str(max(tokens, 1))), limit.press("Enter")))
    tab.enter_text("analyse_text", text)
    frame = tab.routing_view()
    layers = frame.locator("#layer")
    page_slider = tab.page.get_by_role("slider", name="Layer of the charts below")
    in_page, from_here, fragment, fragment_server = [], [], [], []
    for number in range(rounds):
        key = "End" if number % 2 == 0 else "Home"
        tab.page.wait_for_timeout(300)  # let Chromium finish painting: the cores are shared
        switches = int(frame.evaluate("() => +document.body.dataset.switches || 0"))
        start = time.monotonic()
        layers.press(key)
        frame.wait_for_function("n => (+document.body.dataset.switches || 0) > n", arg=switches, polling="raf")
        from_here.append(time.monotonic() - start)
        in_page.append(float(frame.evaluate("() => document.body.dataset.switchMs")) / 1000)

        tab.page.wait_for_timeout(300)
        before = tab.finished
        start = time.monotonic()
        page_slider.press(key)
        fragment.append(tab.wait_for_run(before) - start)
        fragment_server.append(tab.runs[-1][1] - tab.runs[-1][0])
    if tab.dialogs or tab.errors:
        raise RuntimeError(f"the page misbehaved: {tab.dialogs} {tab.errors}")
    shown = tab.token_counts()[0]
    return "\n".join([
        f"| layer switch, {shown:,} tokens | median (ms) |", "|---|---:|",
        f"| routing view: key event to the new layer painted (in the page) | {median_ms(in_page)} |",
        f"| routing view: key press to the view reporting it (Playwright) | {median_ms(from_here)} |",
        f"| page slider: key press until the charts' fragment is redrawn | {median_ms(fragment)} |",
        f"| its script run as the websocket shows it | {median_ms(fragment_server)} |",
        f"| ratio routing view (Playwright) / page slider | {paired(from_here, fragment):.3f} |", "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (at least 15)")
    parser.add_argument("--tokens", type=int, default=1000, help="length of each analysed text")
    parser.add_argument("--skip-browser", action="store_true", help="only the server-side part")
    parser.add_argument("--view", action="store_true", help="only the routing view's layer switch (part 3)")
    parser.add_argument("--view-tokens", type=int, nargs="+", default=[1000, 8192], help="text lengths for --view")
    args = parser.parse_args()
    source = default_model_source()
    loaded = load_model(source, device="cpu")
    if args.view:
        print(f"model {loaded.model_id} ({source}); {args.rounds} rounds of each\n")
        view_switches(loaded, args.view_tokens, args.rounds)
        return
    texts = windows(loaded.tokenizer, args.tokens, args.rounds + 1)
    print(f"model {loaded.model_id} ({source}); {args.rounds} rounds; texts of {args.tokens} tokens\n")
    server_side(texts, args.rounds)
    if not args.skip_browser:
        in_browser(loaded, texts, args.rounds)


if __name__ == "__main__":
    main()
