#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Step 1 of 5: request a TPU VM slice (a queued resource) and the GCS bucket the runs write to.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
BUCKET="${BUCKET:-}"
WAIT=0
WAIT_SECONDS=30

usage() {
  cat <<EOF
Usage: bash tpu_scripts/create.sh [flags]

Requests a TPU VM slice with 'gcloud compute tpus queued-resources create' (queued resource and TPU VM
share the name) and creates the bucket for checkpoints and logs when it does not exist yet.
The request is queued; --wait blocks until the slice is ACTIVE, otherwise check it with
  gcloud compute tpus queued-resources describe NAME --zone=ZONE

Flags (environment variable in brackets):
  --accelerator-type=TYPE   slice type [ACCELERATOR_TYPE] (default: v4-16, two hosts)
  --runtime-version=VER     TPU VM image [RUNTIME_VERSION] (default: tpu-ubuntu2204-base;
                            v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --spot                    Spot capacity (cheaper, preemptible) [SPOT=1]
  --bucket=gs://NAME        bucket for run directories [BUCKET] (default: gs://PROJECT-moejax)
  --wait                    poll every ${WAIT_SECONDS}s until the queued resource is ACTIVE

$COMMON_FLAGS_HELP
EOF
}

while (($#)); do
  parse_common_flag "$1" || case "$1" in
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --wait) WAIT=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

finish_common_settings
BUCKET="${BUCKET:-gs://${PROJECT_ID}-moejax}"
[[ "$BUCKET" =~ ^gs://[a-z0-9][a-z0-9._-]+$ ]] || die "--bucket must look like gs://NAME, got '$BUCKET'"
[[ "$SPOT" == 0 || "$SPOT" == 1 ]] || die "SPOT must be 0 or 1, got '$SPOT'"
[[ -n "$ACCELERATOR_TYPE" && -n "$RUNTIME_VERSION" ]] ||
  die "--accelerator-type and --runtime-version must not be empty"

region="${ZONE%-*}"
if ((DRY_RUN)); then
  echo "# only when $BUCKET does not exist yet:"
  run gcloud storage buckets create "$BUCKET" --project="$PROJECT_ID" --location="$region"
elif ! gcloud storage buckets describe "$BUCKET" --project="$PROJECT_ID" >/dev/null 2>&1; then
  run gcloud storage buckets create "$BUCKET" --project="$PROJECT_ID" --location="$region"
fi

create=(gcloud compute tpus queued-resources create "$TPU_NAME"
  --node-id="$TPU_NAME" --zone="$ZONE" --project="$PROJECT_ID"
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
if ((SPOT)); then
  create+=(--spot)
fi
run "${create[@]}"

if ((WAIT && !DRY_RUN)); then
  while true; do
    state="$(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" \
      --project="$PROJECT_ID" --format='value(state.state)')"
    echo "queued resource $TPU_NAME: $state" >&2
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDED | SUSPENDING) exit 1 ;;
    esac
    sleep "$WAIT_SECONDS"
  done
fi
