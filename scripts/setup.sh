#!/usr/bin/env bash
# Create .venv (if needed) and install the pinned dependencies into it. Sourced by the other
# scripts; safe to run again (pip only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch first, alone: asked for by another package, pip could pick a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
# moeviz itself, editable (code changes need no reinstall), for the `moeviz` command. No build
# isolation and no index: pip builds it with the setuptools already in .venv (a dependency of
# torch), so this works offline. Delete .venv/bin/moeviz to reinstall after editing pyproject.toml.
if [ ! -x .venv/bin/moeviz ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --no-index -e .
fi
