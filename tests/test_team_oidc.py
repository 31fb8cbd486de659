"""Team mode with OIDC, end to end: tests/oidc_signin.py runs the app with an [auth] section
pointing at a local OpenID Connect provider, signs in with Chromium through Streamlit's own
`st.login`, sees the pages and the signed-in user, and signs out."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
TESTS = Path(__file__).resolve().parent


def test_sign_in_and_out_through_an_oidc_provider():
    done = subprocess.run([sys.executable, "oidc_signin.py"], cwd=TESTS,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "signed in as researcher@lab.example; the Analyse page traced" in done.stdout
    assert done.stdout.rstrip().endswith("tokens; signed out")
