#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Step 5 of 5: delete the queued resource and its TPU VMs (the bucket and its run directories stay).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF_USAGE
Usage: bash tpu_scripts/delete.sh [flags]

Deletes the slice: 'gcloud compute tpus queued-resources delete NAME --force' removes the TPU VMs
and then the queued resource, without asking. Checkpoints and metrics in the bucket are kept.

$COMMON_FLAGS_HELP
EOF_USAGE
}

while (($#)); do
  parse_common_flag "$1" || case "$1" in
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

finish_common_settings
run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT_ID" \
  --force --quiet
