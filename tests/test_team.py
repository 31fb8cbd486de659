"""Team-mode settings and the path checks that keep a shared server's files to its data folders."""

import os

import pytest

from moeviz.team import (
    PathRefused,
    TeamSettings,
    TeamSettingsError,
    allowed_path,
    allowed_tree,
    parse_models,
    read_settings,
    server_folder,
)


def test_off_unless_asked():
    assert read_settings({}) == TeamSettings()
    assert read_settings({"MOEVIZ_TEAM": "0", "MOEVIZ_MODELS": "a=b"}).enabled is False


def test_reads_every_variable(tmp_path):
    settings = read_settings({
        "MOEVIZ_TEAM": "1", "MOEVIZ_MODELS": "small=/models/small; mixtral=mistralai/Mixtral-8x7B-v0.1",
        "MOEVIZ_DATA_DIRS": f"{tmp_path}{os.pathsep}{tmp_path}", "MOEVIZ_ACCESS_TOKEN": "s3cret",
        "MOEVIZ_MAX_UPLOAD_MB": "10", "MOEVIZ_MAX_TOKENS": "512", "MOEVIZ_CONCURRENCY": "2",
    })
    assert settings.models == (("small", "/models/small"), ("mixtral", "mistralai/Mixtral-8x7B-v0.1"))
    assert settings.data_dirs == (tmp_path.resolve(), tmp_path.resolve())
    assert (settings.access_token, settings.max_upload_mb, settings.max_tokens, settings.concurrency) == (
        "s3cret", 10, 512, 2)
    assert "s3cret" not in repr(settings)


def test_models_as_json_keep_their_order():
    assert parse_models('{"b": "/m/b", "a": "org/a"}') == (("b", "/m/b"), ("a", "org/a"))


@pytest.mark.parametrize(("text", "match"), [
    ("small", "not name=folder-or-hub-id"), ("=x", "not name="), ('{"a": 1}', "a string"),
    ("{oops", "not valid JSON"), ("a=x;a=y", "twice"),
])
def test_bad_models_say_what_is_expected(text, match):
    with pytest.raises(TeamSettingsError, match=match):
        parse_models(text)


@pytest.mark.parametrize(("variable", "value", "match"), [
    ("MOEVIZ_DATA_DIRS", "relative/dir", "not an existing absolute folder"),
    ("MOEVIZ_DATA_DIRS", "/no/such/folder", "not an existing absolute folder"),
    ("MOEVIZ_CONCURRENCY", "0", "at least 1"), ("MOEVIZ_MAX_TOKENS", "many", "whole number"),
])
def test_bad_values_are_refused(variable, value, match):
    with pytest.raises(TeamSettingsError, match=match):
        read_settings({"MOEVIZ_TEAM": "1", variable: value})


def test_team_mode_needs_a_model():
    assert read_settings({"MOEVIZ_TEAM": "1"}).problems() == [
        "MOEVIZ_MODELS names no model: give at least one, e.g. MOEVIZ_MODELS='small=/models/small'"]
    assert read_settings({"MOEVIZ_TEAM": "1", "MOEVIZ_MODELS": "a=b"}).problems() == []


@pytest.fixture
def shared(tmp_path):
    """data/ (shared) holding run/ and a link out to secret/, beside secret/ (not shared)."""
    data, secret = tmp_path / "data", tmp_path / "secret"
    (data / "run").mkdir(parents=True)
    secret.mkdir()
    (secret / "key.txt").write_text("private")
    (data / "run" / "part-0.parquet").write_text("x")
    (data / "out").symlink_to(secret, target_is_directory=True)
    (data / "inside").symlink_to(data / "run", target_is_directory=True)
    return data.resolve(), secret.resolve()


def test_paths_inside_are_allowed(shared):
    data, _ = shared
    assert allowed_path("run", (data,)) == data / "run"
    assert allowed_path(str(data / "run"), (data,)) == data / "run"
    assert allowed_path("inside", (data,)) == data / "run"  # a link that stays inside
    assert allowed_tree(data / "run", (data,)) == data / "run"


@pytest.mark.parametrize("given", ["../secret", "run/../../secret", "~/anything", "out", "out/key.txt", "/etc"])
def test_paths_out_are_refused(shared, given):
    data, secret = shared
    with pytest.raises(PathRefused, match=r"`\.\.` or `~`|outside the folders"):
        allowed_path(given, (data,))
    with pytest.raises(PathRefused):
        allowed_path(str(secret), (data,))


def test_a_link_out_inside_a_run_folder_is_refused(shared):
    data, secret = shared
    (data / "run" / "part-1.parquet").symlink_to(secret / "key.txt")
    with pytest.raises(PathRefused, match="part-1.parquet is outside"):
        allowed_tree(data / "run", (data,))


def test_no_data_folders_refuses_every_path(tmp_path):
    with pytest.raises(PathRefused, match="MOEVIZ_DATA_DIRS is empty"):
        allowed_path(str(tmp_path), ())


def test_server_folder_is_any_folder_only_in_single_user_mode(shared):
    data, secret = shared
    assert server_folder(str(secret), TeamSettings()) == secret
    with pytest.raises(PathRefused, match="outside the folders"):
        server_folder(str(secret), TeamSettings(enabled=True, models=(("a", "b"),), data_dirs=(data,)))
    assert server_folder("run", TeamSettings(enabled=True, data_dirs=(data,))) == data / "run"
