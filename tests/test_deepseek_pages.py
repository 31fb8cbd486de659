"""Every page on the bundled DeepSeek-style model (fine-grained routed experts beside a shared
expert, sigmoid scores, biased selection): no exception, and the shared expert shown as such
wherever expert load is."""

import json

import pytest
from test_app import run_page

from moeviz.model.loading import BUNDLED_DEEPSEEK, BUNDLED_MODELS, bundled_name
from moeviz.ui import OTHER_MODEL

PAGES = ["analyse", "experts", "compare_layers", "compare_prompts", "domains", "corpus_run", "routing_lab",
         "intervene", "models", "training"]
SHARED = "+ 1 shared expert, always active (not routed)"


def figure_titles(app) -> list[str]:
    """Title and subtitle of every Plotly chart on the page."""
    specs = [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]
    return [f"{s['layout'].get('title', {}).get('text', '')} | "
            f"{s['layout'].get('title', {}).get('subtitle', {}).get('text', '')}" for s in specs]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_runs_on_the_deepseek_style_model(page):
    app = run_page(f"app_pages/{page}.py", model_source=str(BUNDLED_DEEPSEEK))
    assert not app.error, [e.value for e in app.error]
    summary = [c.value for c in app.caption if "deepseek_v3" in c.value]  # the sidebar's model line
    assert summary and "32 experts + 1 shared" in summary[0], summary


def test_analyse_page_shows_the_shared_expert_beside_the_routed_ones():
    app = run_page("app_pages/analyse.py", model_source=str(BUNDLED_DEEPSEEK))
    titles = figure_titles(app)
    routed = [t for t in titles if t.startswith(("Router scores", "Share of tokens per expert"))]
    assert len(routed) == 2 and all(SHARED in t for t in routed), titles


def test_models_page_names_the_shared_expert_and_the_biased_sigmoid_router():
    app = run_page("app_pages/models.py", model_source=str(BUNDLED_DEEPSEEK))
    shown = " ".join(str(t.value.to_dict()) for t in app.table) + " ".join(m.value for m in app.markdown)
    assert "1, always active" in shown, shown[:2000]


def test_sidebar_offers_both_bundled_models_by_name(tmp_path):
    app = run_page()
    picker = app.sidebar.selectbox(key="model_bundled")
    assert picker.options == [*BUNDLED_MODELS, OTHER_MODEL] and picker.value == "moeviz Mixtral-style (bundled)"
    picker.set_value("moeviz DeepSeek-style (bundled)").run()
    assert app.sidebar.text_input(key="model_source").value == str(BUNDLED_DEEPSEEK)
    assert any("deepseek_v3" in c.value and "32 experts + 1 shared" in c.value for c in app.caption)
    app.sidebar.text_input(key="model_source").set_value(str(tmp_path)).run()  # a typed folder: "another model"
    assert app.sidebar.selectbox(key="model_bundled").value == OTHER_MODEL
    app.sidebar.selectbox(key="model_bundled").set_value("moeviz Mixtral-style (bundled)").run()
    assert not app.exception and any("mixtral" in c.value for c in app.caption)


def test_bundled_names_only_for_the_bundled_folders(tmp_path):
    assert bundled_name(BUNDLED_DEEPSEEK / ".." / "model-deepseek") == "moeviz DeepSeek-style (bundled)"
    for other in (tmp_path, "mistralai/Mixtral-8x7B-v0.1", "a\x00b", ""):
        assert bundled_name(other) is None


def test_training_page_offers_the_sidebar_models_history_and_reports_a_damaged_one(tmp_path):
    """A local model folder with its own training history is offered beside the bundled ones;
    a damaged history is reported on the page, not raised."""
    import shutil

    from moeviz.analysis import training

    folder = tmp_path / "my-run"
    shutil.copytree(BUNDLED_DEEPSEEK, folder)
    app = run_page("app_pages/training.py", model_source=str(folder))
    radio = app.radio(key="training_model")
    assert radio.options == [*[n for n, f in BUNDLED_MODELS.items() if training.has_history(f)], "my-run"]
    radio.set_value("my-run").run()
    assert not app.error and any("**my-run**" in m.value for m in app.markdown)
    (folder / training.ARRAYS).write_bytes(b"PK\x03\x04 not really a zip")
    app.run()
    assert [e.value for e in app.error] == [f"{folder / training.ARRAYS} is not a NumPy archive of plain arrays: File is not a zip file"]
