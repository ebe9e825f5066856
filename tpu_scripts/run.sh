#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Step 3 of 5: preflight the config here, then start the trainer on every worker of the slice,
# detached, logging to ~/REMOTE_DIR/train.log.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="${CONFIG:-experiments/default.py}"
BUCKET="${BUCKET:-}"
WORKDIR="${WORKDIR:-}"
TOPOLOGY="${TOPOLOGY:-v4:2x2x2}"
PREFLIGHT="${PREFLIGHT:-1}"
checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${LOCAL_PYTHON:-}" ]]; then
  LOCAL_PYTHON=python3
  [[ -x "$checkout/.venv/bin/python" ]] && LOCAL_PYTHON="$checkout/.venv/bin/python"
fi
trainer_flags=()

usage() {
  cat <<EOF
Usage: bash tpu_scripts/run.sh [flags] [-- --config.KEY=VALUE ...]

First runs the preflight here, on this machine's CPU: 'python -m moejax.preflight --config=CONFIG
--topology=TOPOLOGY' compiles the config's train step for the slice with the TPU compiler and stops
the launch when it does not compile or does not fit in the chips' memory.
Then starts 'python -m moejax.main --config=CONFIG --workdir=WORKDIR' in ~/REMOTE_DIR on every worker
('gcloud compute tpus tpu-vm ssh --worker=all'), in the background so it survives the ssh session;
each host logs to ~/REMOTE_DIR/train.log (see logs.sh). The hosts find each other by themselves
(jax.distributed on a TPU slice needs no coordinator flags). Running again with the same
workdir resumes from its last checkpoint (e.g. after a Spot preemption). One run at a time holds the
TPU; stop the current one first:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='pkill -f moejax.main'

Flags (environment variable in brackets):
  --config=FILE        experiment config, relative to the checkout [CONFIG] (default: experiments/default.py)
  --workdir=gs://...   checkpoints and metrics [WORKDIR] (default: BUCKET/NAME/<config file stem>)
  --bucket=gs://NAME   bucket of the default workdir [BUCKET] (default: gs://PROJECT-moejax)
  --remote-dir=DIR     checkout directory under the workers' home [REMOTE_DIR] (default: moejax)
  --topology=TOPOLOGY  the slice's chips for the preflight [TOPOLOGY] (default: v4:2x2x2, the
                       v4-16 of create.sh; v5p-64: v5p:2x4x4, v5e-256: v5e:16x16, v6e-256: v6e:16x16)
  --no-preflight       launch without the preflight [PREFLIGHT=0]
  --local-python=PATH  Python that runs the preflight here, with moejax and libtpu installed
                       [LOCAL_PYTHON] (default: this checkout's .venv/bin/python, else python3)
  -- ARGS              everything after -- goes to the trainer, e.g. -- --config.num_train_steps=1000

$COMMON_FLAGS_HELP
EOF
}

while (($#)); do
  parse_common_flag "$1" || case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --topology=*) TOPOLOGY="${1#*=}" ;;
    --no-preflight) PREFLIGHT=0 ;;
    --local-python=*) LOCAL_PYTHON="${1#*=}" ;;
    --) shift; trainer_flags=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

finish_common_settings
[[ -n "$CONFIG" ]] || die "--config must not be empty"
BUCKET="${BUCKET:-gs://${PROJECT_ID}-moejax}"
config_file="${CONFIG%%:*}"
config_stem="$(basename "$config_file" .py)"
WORKDIR="${WORKDIR:-$BUCKET/$TPU_NAME/$config_stem}"
# Every host must see the same checkpoints: a host-local directory would split them.
[[ "$WORKDIR" == gs://?* ]] || die "--workdir must be a gs:// path shared by all hosts, got '$WORKDIR'"

# ${a[@]+...}: an empty array under set -u is an error in bash 3.2 (macOS).
if [[ "$PREFLIGHT" == 1 ]]; then
  [[ -n "$TOPOLOGY" ]] || die "--topology must not be empty (or pass --no-preflight)"
  # The trainer's --config.* overrides apply to the preflight too.
  (cd "$checkout" && run env JAX_PLATFORMS=cpu "$LOCAL_PYTHON" -m moejax.preflight \
    --config="$CONFIG" --topology="$TOPOLOGY" ${trainer_flags[@]+"${trainer_flags[@]}"}) ||
    die "preflight failed for $CONFIG on $TOPOLOGY (see above): fix the config, or pass --no-preflight to launch anyway"
fi
train=(.venv/bin/python -m moejax.main --config="$CONFIG" --workdir="$WORKDIR"
  ${trainer_flags[@]+"${trainer_flags[@]}"})
trainer="$(command_line "${train[@]}")"
ssh_workers all "set -e; cd $REMOTE_DIR; nohup $trainer > train.log 2>&1 < /dev/null & echo \"\$(hostname): started, log in ~/$REMOTE_DIR/train.log\""
