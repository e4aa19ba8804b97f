#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it reaches no registry), for scripts/device_train.sh:
# diffusers (the samplers' schedulers) at the version this checkout's .venv uses, and an
# importlib_metadata that needs nothing the machine does not have. Pure Python, ~4 MB in .whl/
# (gitignored; the device tool's carry takes it along).
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS=$(.venv/bin/python -c "import diffusers; print(diffusers.__version__)")
rm -rf .whl && mkdir .whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "diffusers==$DIFFUSERS" "importlib_metadata==8.7.0"
ls -la .whl
