#!/usr/bin/env bash
# Install what is needed, then start moeviz on the bundled model at http://localhost:8501
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m streamlit run app.py "$@"
