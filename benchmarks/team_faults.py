"""Faults on a team-mode server while another session keeps working.

One team-mode server (127.0.0.1, a shared token) offers the bundled model and a copy of it whose
weights file was cut in half ("broken"), with a data folder holding a corpus run killed with
SIGKILL in the middle of writing it. A "steady" browser tab analyses a new text of its own
after every fault and must get its own routing (its token count checked against `trace_text`)
with no error; meanwhile other tabs cause the faults:

1. a tab sends a long text and is closed while its forward pass waits or runs;
2. a tab picks the broken model: its load fails midway, the page says so and stays usable;
3. a tab opens the killed corpus run: only the parts written whole are read;
4. a tab uploads a trace file truncated on disk: refused as damaged.

Then every tab but the steady one closes, and the server must still be up.
Bounded: loopback only, about a minute on 2 cores.

    .venv/bin/python benchmarks/team_faults.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the browser machinery of the e2e tests

from browser import AppFailed, AppPage, chromium, running_app

from moeviz.model.capture import DEFAULT_MAX_TOKENS, trace_text
from moeviz.model.loading import BUNDLED_MODEL, load_model
from moeviz.model.tokens import context_length
from moeviz.runs import store as runs

TOKEN = "fault-test-token"
SAMPLES = ROOT / "assets" / "samples"


def broken_copy(folder: Path) -> Path:
    """The bundled model with its weights file cut in half: loading starts, then fails."""
    shutil.copytree(BUNDLED_MODEL, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


def killed_corpus_run(data: Path) -> Path:
    """A `moeviz corpus` run killed with SIGKILL once its first part is on disk."""
    corpus = data / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as out:
        for sample in sorted(SAMPLES.glob("*.txt")):
            text = sample.read_text(encoding="utf-8")
            for i in range(6):
                out.write(json.dumps({"text": text[i * 300:(i + 1) * 300], "domain": sample.stem}) + "\n")
    run = data / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "moeviz", "corpus", str(corpus), "-o", str(run), "--model",
                                str(BUNDLED_MODEL), "--batch-size", "1", "--max-tokens", "128"],
                               env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not runs.part_paths(run) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.returncode != -signal.SIGKILL:
        raise RuntimeError("the corpus run ended before it could be killed")
    return run


def sign_in(tab: AppPage) -> AppPage:
    tab.open()
    tab.page.locator(".st-key-team_access_token input").fill(TOKEN)
    return tab.act(lambda: tab.page.get_by_role("button", name="Sign in").click())


def go_to(tab: AppPage, title: str) -> None:
    """Another page of the same session (a new URL would be a new session, signed out)."""
    tab.act(lambda: tab.page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click())


def pick_model(tab: AppPage, name: str) -> None:
    tab.act(lambda: (tab.page.locator(".st-key-model_name").click(),
                     tab.page.get_by_role("option", name=name, exact=True).click()))


class Steady:
    """The session that must not notice the others' faults."""

    def __init__(self, tab: AppPage, model, limit: int, corpus: str):
        self.tab, self.model, self.limit, self.corpus, self.round = tab, model, limit, corpus, 0

    def check(self, after: str) -> str:
        self.round += 1
        text = self.corpus[self.round * 1000:self.round * 1000 + 200 + 17 * self.round]
        try:
            self.tab.enter_text("analyse_text", text)
        except AppFailed as error:
            return f"after {after}: the steady session failed: {error}"
        trace = trace_text(self.model.model, self.model.tokenizer, text, max_tokens=self.limit)
        expected = trace.num_tokens - int(trace.special.sum())
        shown = self.tab.token_counts()[:1]
        return "" if shown == [expected] else f"after {after}: the steady session shows {shown}, not [{expected}]"


def close_mid_forward(tab: AppPage, corpus: str) -> str:
    tab.start_typing("analyse_text", corpus[:9000])
    tab.send("analyse_text")
    tab.page.wait_for_timeout(150)  # the run has started: waiting for the model or running it
    tab.page.close()
    return ""


def broken_model(tab: AppPage) -> str:
    pick_model(tab, "broken")
    alerts = " ".join(tab.alerts())
    if "Could not load the model" not in alerts or "broken" not in alerts:
        return f"the broken model's failure is not explained: {alerts!r}"
    pick_model(tab, "bundled")
    return "" if tab.token_counts() else "after the broken model, the bundled one shows no trace"


def killed_run(tab: AppPage, run: Path) -> str:
    go_to(tab, "Corpus run")
    field = tab.page.locator(".st-key-corpus_run_path input")
    tab.act(lambda: (field.fill(str(run)), field.press("Enter")))
    whole = runs.read_run(run).documents
    captions = " ".join(tab.page.locator('[data-testid="stCaptionContainer"]').all_inner_texts())
    if f"{whole:,} documents" not in captions:
        return f"the killed run should show its {whole} whole documents: {captions!r}"
    return ""


def truncated_trace(tab: AppPage, model, data: Path) -> str:
    trace = trace_text(model.model, model.tokenizer, "A trace file that will be cut on disk.")
    path = data / "cut.safetensors"
    path.write_bytes(trace.to_bytes())
    path.write_bytes(path.read_bytes()[:200])
    tab.act(lambda: tab.page.get_by_text("Trace file", exact=True).click())
    uploader = tab.page.locator(".st-key-analyse_text_file input[type=file]")
    tab.act(lambda: uploader.set_input_files(str(path)))
    alerts = " ".join(tab.alerts())
    return "" if "truncated" in alerts else f"the cut trace file was not refused: {alerts!r}"


def main() -> int:
    corpus = "\n".join(path.read_text(encoding="utf-8") for path in sorted(SAMPLES.glob("*.txt")))
    model = load_model(str(BUNDLED_MODEL))
    limit = min(DEFAULT_MAX_TOKENS, context_length(model.model.config))
    problems = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = scratch / "data"
        data.mkdir()
        broken = broken_copy(scratch / "broken")
        run = killed_corpus_run(data)
        env = os.environ | {"MOEVIZ_TEAM": "1", "MOEVIZ_ACCESS_TOKEN": TOKEN, "MOEVIZ_DATA_DIRS": str(data),
                            "MOEVIZ_MODELS": f"bundled={BUNDLED_MODEL};broken={broken}"}
        with running_app(scratch / "server.log", env) as url, chromium(scratch / "profile") as browser:
            def new_tab() -> AppPage:
                return sign_in(AppPage(browser.new_page(), url))

            steady = Steady(new_tab(), model, limit, corpus)
            others = []
            for name, fault in [
                ("a tab closed mid-forward", lambda tab: close_mid_forward(tab, corpus)),
                ("a model whose load fails midway", broken_model),
                ("a corpus run killed mid-part", lambda tab: killed_run(tab, run)),
                ("a trace file truncated on disk", lambda tab: truncated_trace(tab, model, data)),
            ]:
                tab = new_tab()
                others.append(tab)
                try:
                    problem = fault(tab)
                except AppFailed as error:
                    problem = f"{type(error).__name__}: {error}"
                problems += [f"{name}: {problem}"] if problem else []
                problems += [p for p in [steady.check(name)] if p]
                print(f"{name}: {'ok' if not problem else problem}", flush=True)
            for tab in others:
                if not tab.page.is_closed():
                    problems += [f"page error: {e}" for e in tab.errors]
                    tab.page.close()
            problems += [p for p in [steady.check("the other tabs closed")] if p]
            problems += [f"steady page error: {e}" for e in steady.tab.errors]
    print(f"{len(problems)} problems" + "".join(f"\n  {p}" for p in problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
