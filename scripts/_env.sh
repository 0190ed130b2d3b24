# Sourced by scripts/*: create or reuse .venv and install jaxptq into it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extra="${1:-}"
py="${PYTHON:-python3}"
# pip's output (setuptools' editable-install warnings among it) goes to a log that is
# shown only if the install fails.
quiet_pip() {
  local log
  log="$(mktemp)"
  if ! .venv/bin/python -m pip "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}
if [ ! -x .venv/bin/python ]; then
  echo "setting up .venv (first run only)" >&2
  "$py" -m venv .venv
  quiet_pip install -q --upgrade pip
fi
stamp=".venv/.installed${extra:+-$extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing jaxptq${extra:+[$extra]} into .venv" >&2
  quiet_pip install -q -e ".${extra:+[$extra]}"
  touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
