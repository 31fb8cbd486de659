"""The short version of benchmarks/team_load.py: signed-in browser sessions on a team-mode
server send texts at once; each page must show the routing of its own text, with no error, and
the server's memory comes back down once the sessions end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_concurrent_team_sessions_each_see_their_own_text():
    done = subprocess.run([sys.executable, "benchmarks/team_load.py", "--sessions", "3", "--seconds", "5", "--session-ttl", "5"],
                          cwd=ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "errors 0; wrong token counts 0" in done.stdout
    assert "of the warm figure (within 10%)" in done.stdout


def test_faults_leave_the_server_and_the_other_sessions_working():
    """benchmarks/team_faults.py: a tab closed mid-forward, a model whose load fails midway, a
    corpus run killed mid-part, a trace file cut on disk; a steady session keeps getting its own
    routing after each."""
    done = subprocess.run([sys.executable, "benchmarks/team_faults.py"],
                          cwd=ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    for fault in ("a tab closed mid-forward", "a model whose load fails midway", "a corpus run killed mid-part",
                  "a trace file truncated on disk"):
        assert f"{fault}: ok" in done.stdout
    assert "0 problems" in done.stdout
