# shellcheck shell=bash
# Settings and helpers shared by the pod scripts (sourced, not run).
#
# Every setting has a default and may come from the environment (the names Cloud TPU's own guides
# export) or from a --flag=VALUE, the flag winning. PROJECT_ID defaults to gcloud's configured project.

TPU_NAME="${TPU_NAME:-moejax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT_ID="${PROJECT_ID:-}"
REMOTE_DIR="${REMOTE_DIR:-moejax}"
DRY_RUN=0

# shellcheck disable=SC2034  # read by the scripts that source this file
COMMON_FLAGS_HELP="Common flags (environment variable in brackets):
  --name=NAME         TPU VM and queued-resource name [TPU_NAME] (default: moejax)
  --zone=ZONE         zone [ZONE] (default: us-central2-b)
  --project=PROJECT   project [PROJECT_ID] (default: gcloud config get-value project)
  --dry-run           print the commands, run nothing (only reads gcloud's configured project)
  -h, --help          this help"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Sets a common setting from "$1" and returns 0, or returns 1 when "$1" is not a common flag.
parse_common_flag() {
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT_ID="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --name | --zone | --project) die "$1 takes a value: $1=VALUE" ;;
    *) return 1 ;;
  esac
}

# Fills PROJECT_ID from gcloud's configuration when no project was given; then checks the settings
# every script uses.
finish_common_settings() {
  if [[ -z "$PROJECT_ID" ]]; then
    PROJECT_ID="$(gcloud config get-value project 2>/dev/null || true)"
    [[ -n "$PROJECT_ID" ]] ||
      die "no project: pass --project=PROJECT or run 'gcloud config set project PROJECT'"
  fi
  [[ -n "$TPU_NAME" ]] || die "--name must not be empty"
  [[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone must look like us-central2-b, got '$ZONE'"
  [[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ ]] ||
    die "--remote-dir must be a plain path relative to the workers' home directory, got '$REMOTE_DIR'"
}

# One argument as the shell would need it typed (--flag='value' when only the value needs quotes).
quote_arg() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ "$1" =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[a-z-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_arg "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

command_line() {
  local line="" arg
  for arg in "$@"; do
    line+="${line:+ }$(quote_arg "$arg")"
  done
  printf '%s\n' "$line"
}

# Runs a command, echoing it to stderr first; with --dry-run prints it to stdout instead.
run() {
  if ((DRY_RUN)); then
    command_line "$@"
  else
    echo "+ $(command_line "$@")" >&2
    "$@"
  fi
}

# `gcloud compute tpus tpu-vm ssh` on the given workers of the TPU VM, running one shell command.
ssh_workers() {
  local worker="$1" remote_command="$2"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT_ID" \
    --worker="$worker" --command="$remote_command"
}
