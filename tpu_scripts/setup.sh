#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Step 2 of 5: put the code on every worker of the slice and install it with the TPU extras.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_URL="${REPO_URL:-}"
BRANCH="${BRANCH:-main}"
SOURCE_DIR="${SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"

usage() {
  cat <<EOF
Usage: bash tpu_scripts/setup.sh [flags]

On every worker ('gcloud compute tpus tpu-vm ssh --worker=all'): copies this checkout (or clones
--repo-url) into ~/REMOTE_DIR, makes a Python $PYTHON_VERSION virtual environment ~/REMOTE_DIR/.venv with uv
(TPU VM images ship an older Python than JAX needs) and runs pip install -e '.[tpu]' in it.
Run it again after changing the code.

Flags (environment variable in brackets):
  --source-dir=DIR      local checkout to copy [SOURCE_DIR] (default: the one holding this script)
  --repo-url=URL        clone this git repository on the workers instead [REPO_URL]
  --branch=BRANCH       branch or tag to check out with --repo-url [BRANCH] (default: main)
  --python=VERSION      Python version of the environment [PYTHON_VERSION] (default: 3.11)
  --remote-dir=DIR      checkout directory under the workers' home [REMOTE_DIR] (default: moejax)

$COMMON_FLAGS_HELP
EOF
}

while (($#)); do
  parse_common_flag "$1" || case "$1" in
    --source-dir=*) SOURCE_DIR="${1#*=}" ;;
    --repo-url=*) REPO_URL="${1#*=}" ;;
    --branch=*) BRANCH="${1#*=}" ;;
    --python=*) PYTHON_VERSION="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

finish_common_settings
[[ "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]] || die "--python must look like 3.11, got '$PYTHON_VERSION'"
dir="$REMOTE_DIR"

if [[ -n "$REPO_URL" ]]; then
  url="$(quote_arg "$REPO_URL")"
  branch="$(quote_arg "$BRANCH")"
  fetch="if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin $branch && git -C $dir checkout --quiet FETCH_HEAD; else git clone --quiet --branch $branch $url $dir; fi"
else
  [[ -f "$SOURCE_DIR/setup.cfg" ]] || die "--source-dir must be a moejax checkout, got '$SOURCE_DIR'"
  archive="${TMPDIR:-/tmp}/moejax-src-$TPU_NAME.tar.gz"
  trap 'rm -f "$archive"' EXIT
  run tar -czf "$archive" -C "$SOURCE_DIR" --exclude=.git --exclude=.venv --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis .
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:moejax-src.tar.gz" --zone="$ZONE" \
    --project="$PROJECT_ID" --worker=all
  fetch="mkdir -p $dir && tar -xzf moejax-src.tar.gz -C $dir && rm moejax-src.tar.gz"
fi

install="python3 -m pip install --quiet --user --upgrade uv"
install+=" && python3 -m uv venv --quiet --allow-existing --python $PYTHON_VERSION $dir/.venv"
install+=" && cd $dir && python3 -m uv pip install --quiet --python .venv/bin/python -e \".[tpu]\""
ssh_workers all "set -e; $fetch; $install"
