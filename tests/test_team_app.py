"""Team mode in the running app (AppTest): the sign-in gate in front of every page, the model
allowlist and the data folders. Single-user mode is what every other app test runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from moeviz import signin
from moeviz.model.loading import BUNDLED_MODEL

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TOKEN = "correct horse battery staple"


@pytest.fixture
def team(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEVIZ_TEAM", "1")
    monkeypatch.setenv("MOEVIZ_MODELS", f"bundled={BUNDLED_MODEL}")
    monkeypatch.setenv("MOEVIZ_DATA_DIRS", str(tmp_path))
    monkeypatch.setenv("MOEVIZ_ACCESS_TOKEN", TOKEN)
    monkeypatch.setenv("MOEVIZ_MAX_TOKENS", "64")
    monkeypatch.setattr(signin, "WRONG_TOKEN_DELAY", 0.0)
    return tmp_path


def start() -> AppTest:
    app = AppTest.from_file(APP, default_timeout=300)
    app.run()
    assert not app.exception, [e.message for e in app.exception]
    return app


def every_text(app: AppTest) -> str:
    return " ".join(str(e.value) for kind in ("markdown", "caption", "error", "info", "title", "text_input")
                    for e in getattr(app, kind))


def sign_in(app: AppTest, token: str) -> AppTest:
    app.text_input(key=signin.TOKEN_FIELD).input(token)
    app.button[0].click().run()
    assert not app.exception, [e.message for e in app.exception]
    return app


def test_signed_out_sees_only_the_sign_in_form(team):
    app = start()
    assert [t.label for t in app.text_input] == ["Access token"]
    assert len(app.sidebar) == 0 and len(app.selectbox) == 0 and len(app.caption) == 0
    assert "access token" in every_text(app)


def test_a_wrong_token_is_refused(team):
    app = sign_in(start(), "wrong")
    assert [e.value for e in app.error] == [
        "That access token is not the one this server expects. Check it with whoever runs the server."]
    assert [t.label for t in app.text_input] == ["Access token"] and len(app.sidebar) == 0
    assert signin.SIGNED_IN not in app.session_state


def test_the_right_token_opens_the_pages_with_only_allowed_models(team):
    app = sign_in(start(), TOKEN)
    assert app.session_state[signin.SIGNED_IN] is True
    picker = app.sidebar.selectbox(key="model_name")
    assert picker.options == ["bundled"] and picker.value == "bundled"
    assert not [t for t in app.sidebar.text_input if t.key == "model_source"]  # no free-form model field
    assert app.sidebar.number_input[0].max == 64
    assert any(c.value.split(" tokens · ")[0].isdigit() for c in app.caption)  # the Analyse page ran the model
    assert TOKEN not in every_text(app)
    assert signin.TOKEN_FIELD not in app.session_state  # the token is not kept


def test_the_corpus_run_page_refuses_paths_outside_the_data_folders(team, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (team / "link").symlink_to(outside, target_is_directory=True)
    app = sign_in(start(), TOKEN)
    app.switch_page("app_pages/corpus_run.py").run()
    for given, message in [(str(outside), "outside the folders"), ("../x", "`..` or `~`"),
                           ("link", "outside the folders"), ("missing", "")]:
        app.text_input(key="corpus_run_path").input(given).run()
        assert not app.exception, [e.message for e in app.exception]
        assert len(app.error) == 1 and message in app.error[0].value, (given, app.error[0].value)


def test_team_mode_without_a_way_to_sign_in_serves_nothing(team, monkeypatch):
    monkeypatch.delenv("MOEVIZ_ACCESS_TOKEN")
    app = start()
    assert "needs a way to sign in" in app.error[0].value
    assert len(app.text_input) == 0 and len(app.sidebar) == 0


def test_unreadable_settings_serve_nothing(team, monkeypatch):
    monkeypatch.setenv("MOEVIZ_MODELS", "no-equals-sign")
    app = start()
    assert "team settings cannot be read" in app.error[0].value and len(app.sidebar) == 0


def test_with_oidc_configured_sign_in_goes_to_the_provider(team):
    app = AppTest.from_file(APP, default_timeout=300)
    app.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x",
                           "google": {"client_id": "id", "client_secret": "s", "server_metadata_url": "https://x"}}
    app.user = {"is_logged_in": False}
    app.run()
    assert [b.label for b in app.button] == ["Sign in"] and len(app.text_input) == 0 and len(app.sidebar) == 0
    app.user = {"is_logged_in": True, "email": "a@lab.org"}
    app.run()
    assert not app.exception and app.sidebar.selectbox(key="model_name").options == ["bundled"]
    assert [t.value for t in app.sidebar.text] == ["Signed in as a@lab.org"]
    assert [b.label for b in app.sidebar.button] == ["Sign out"]


def test_a_page_waits_for_its_turn_on_the_model():
    """The Analyse page's forward pass goes through the model's queue: while another session
    holds the model, the page's run does not finish; once the model is free, it does."""
    from test_app import run_behind_another_session

    from moeviz.ui import cached_queue, default_model_source

    app = start()
    queue = cached_queue(default_model_source(), "auto", "auto", "auto")
    app.text_area(key="analyse_text").input("a text no other test analyses: queue, queue, queue")
    run_behind_another_session(app, queue, wait=10, finish=60)
    assert any(" tokens · " in c.value for c in app.caption)  # the trace came back


def test_compare_variants_offers_only_the_allowed_models_for_model_b(team):
    """Model B comes from $MOEVIZ_MODELS, never from a typed path or hub id."""
    app = sign_in(start(), TOKEN)
    app.switch_page("app_pages/compare_variants.py").run()
    app.radio(key="variants_b").set_value("another local model or checkpoint").run()
    assert not app.exception, [e.message for e in app.exception]
    assert not [t for t in app.text_input if t.key == "variants_b_source"]
    assert app.selectbox(key="variants_b_name").options == ["bundled"]
