#!/usr/bin/env bash
# Wheels for a lent GPU machine (the `device` tool): its image has torch,
# accelerate, huggingface-hub, scipy, scikit-image and the rest, but not
# diffusers, nibabel or dipy (nor trx-python, which dipy.core imports).
# Versions are this checkout's .venv's, so both machines run the same code.
#
#   bash scripts/device_wheels.sh            # -> .whl/ (git-ignored), about 20 MB
#
# There: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==$(version diffusers)" "nibabel==$(version nibabel)" "dipy==$(version dipy)" "trx-python==$(version trx-python)"
ls .whl
