#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Step 4 of 5: show the trainer's log (~/REMOTE_DIR/train.log) from one worker or all of them.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="${WORKER:-0}"
LOG_LINES="${LOG_LINES:-100}"
FOLLOW=0

usage() {
  cat <<EOF_USAGE
Usage: bash tpu_scripts/logs.sh [flags]

Prints the last lines of ~/REMOTE_DIR/train.log ('gcloud compute tpus tpu-vm ssh --worker=WORKER').
Worker 0 logs the metrics; the others mostly repeat its start-up lines.

Flags (environment variable in brackets):
  --worker=N|all      which worker(s) [WORKER] (default: 0)
  --lines=N           how many lines [LOG_LINES] (default: 100)
  --follow            keep printing new lines (tail -F) until interrupted
  --remote-dir=DIR    checkout directory under the workers' home [REMOTE_DIR] (default: moejax)

$COMMON_FLAGS_HELP
EOF_USAGE
}

while (($#)); do
  parse_common_flag "$1" || case "$1" in
    --worker=*) WORKER="${1#*=}" ;;
    --lines=*) LOG_LINES="${1#*=}" ;;
    --follow) FOLLOW=1 ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

finish_common_settings
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker number or 'all', got '$WORKER'"
[[ "$LOG_LINES" =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LOG_LINES'"

tail_flags="-n $LOG_LINES"
if ((FOLLOW)); then
  tail_flags+=" -F"
fi
ssh_workers "$WORKER" "tail $tail_flags $REMOTE_DIR/train.log"
