#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the package.
#   bash scripts/setup.sh          # the package, for running `qid2`
#   bash scripts/setup.sh --test   # plus test tools, MRtrix3 and Chromium (Debian), the real mdt scan
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
  # System programs the tests drive: MRtrix3 (independent FA cross-check) and
  # Chromium (the demo's browser test). Installed only where missing.
  need=()
  command -v dwi2tensor >/dev/null 2>&1 || need+=(mrtrix3)
  [[ -x /usr/bin/chromium ]] || need+=(chromium)
  if (( ${#need[@]} )) && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

python3 -m venv .venv
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
if [[ -n "$extras" ]]; then
  # The real Siemens scan inside the mdt wheel, for the real-data tests and
  # benchmark (read from the wheel as a zip; mdt is never installed). Cached:
  # a second run finds tests/data/real/mdt_b1k_b2k and does nothing.
  .venv/bin/python -m qid2_diffusers.data.real tests/data/real >/dev/null
fi
