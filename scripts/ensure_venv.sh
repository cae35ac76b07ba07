#!/usr/bin/env bash
# Create .venv when missing and (re)install the project when pyproject.toml changed. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.lvdflow-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import lvdflow" 2>/dev/null; then
  echo "installing lvdflow and its dependencies into .venv (torch is large: this takes a few minutes once)"
  .venv/bin/python -m pip install -q --upgrade pip
  # pip compiles the ~16,000 .py files it installs one at a time: two of the four minutes of this install.
  # The same compile on every core, skipping the packages' own test suites (nothing imports them), takes
  # under one. Bytecode is written either way, as pip does, so that PYTHONDONTWRITEBYTECODE=1 (common in
  # CI images) does not leave every process recompiling torch and Prefect when it imports them.
  .venv/bin/python -m pip install -q --no-compile -e '.[test]'
  .venv/bin/python - <<'PY'
import compileall, re, sysconfig
site = sysconfig.get_paths()["purelib"]
compileall.compile_dir(site, quiet=2, workers=0, rx=re.compile(re.escape(site) + r"/.+/tests?/"))
PY
  echo "$want" > "$stamp"
fi
