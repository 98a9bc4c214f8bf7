#!/usr/bin/env bash
# Creates (once) and updates the project's virtualenv under ~/.cache, keyed by Python version.
# Re-running is cheap: pip runs only when pyproject.toml changed since the last install.
# Prints the venv directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
pyver="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
venv="${KVRELAY_VENV:-${KVRELAY_CACHE:-$HOME/.cache/kvrelay}/venv-py${pyver}}"
stamp="$venv/.kvrelay-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) $root"
if [[ ! -x "$venv/bin/python" ]]; then
  "$py" -m venv "$venv" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
fi
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "installing kvrelay and its pinned dependencies into $venv (first time: several minutes)" >&2
  "$venv/bin/pip" install -q -e "$root[all,dev]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
