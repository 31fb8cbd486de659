"""`moeviz serve --team`: checks its settings before starting, passes the upload limit to
Streamlit, stays on 127.0.0.1 and never prints the access token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import free_port, wait_until_serving

from moeviz.model.loading import BUNDLED_MODEL

REPO = Path(__file__).resolve().parent.parent
TOKEN = "team-token-never-printed"
ENV = {key: value for key, value in os.environ.items() if not key.startswith("MOEVIZ_")} | {
    "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def moeviz(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeviz", *args], env=ENV | env, capture_output=True, text=True, check=False,
                          timeout=60)


@pytest.mark.parametrize(("env", "message"), [
    ({}, "MOEVIZ_MODELS names no model"),
    ({"MOEVIZ_MODELS": "small"}, "MOEVIZ_MODELS: 'small' is not name=folder-or-hub-id"),
    ({"MOEVIZ_MODELS": "a=b", "MOEVIZ_CONCURRENCY": "0"}, "MOEVIZ_CONCURRENCY is '0'"),
    ({"MOEVIZ_MODELS": "a=b"}, "team mode needs $MOEVIZ_ACCESS_TOKEN"),
])
def test_serve_team_refuses_settings_it_cannot_serve_safely(env, message):
    done = moeviz("serve", "--team", "--port", "9", env=env)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_serve_team_starts_on_localhost_with_the_upload_limit():
    port = free_port()
    env = ENV | {"MOEVIZ_MODELS": f"bundled={BUNDLED_MODEL}", "MOEVIZ_ACCESS_TOKEN": TOKEN,
                 "MOEVIZ_MAX_UPLOAD_MB": "7"}
    server = subprocess.Popen([sys.executable, "-m", "moeviz", "serve", "--team", "--port", str(port)], env=env,
                              cwd=REPO.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(server, port)
        command = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert command[command.index(b"--server.address") + 1] == b"127.0.0.1"
        assert command[command.index(b"--server.maxUploadSize") + 1] == b"7"
        assert b"MOEVIZ_TEAM=1" in Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert TOKEN not in out + err
