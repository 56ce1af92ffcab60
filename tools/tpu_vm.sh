#!/usr/bin/env bash
# Run one llama3-jax command on every worker of a Cloud TPU VM pod slice (v5e, v6e, v4, v5p).
#
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a tools/tpu_vm.sh setup
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a tools/tpu_vm.sh run llama3-jax train --config configs/tiny.yaml \
#       workdir=/mnt/shared/runs/tiny batch_size=16   # a directory every worker sees
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a tools/tpu_vm.sh stop      # SIGTERM: one checkpoint, every worker exits 0
#
# `setup` copies this checkout (git archive HEAD) to every worker and installs it with jax[tpu].
# `run` starts the same command on all workers at once (gcloud ... ssh --worker=all); each worker's
# llama3-jax detects the pod slice by itself and joins jax.distributed, so no address is passed.
# Logs come from worker 0; the other workers print only their own errors, prefixed [process I].
# PROJECT (optional) picks the gcloud project; REMOTE_DIR (default ~/llama3-jax) is the checkout.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
REMOTE_DIR=${REMOTE_DIR:-llama3-jax}  # relative to the worker's home
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}

case "${1:-}" in
  setup)
    tarball=$(mktemp --suffix=.tar.gz)
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":llama3-jax.tar.gz --zone "$ZONE" "${PROJECT_FLAG[@]}" \
      --worker=all
    rm -f "$tarball"
    on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -xzf llama3-jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && \
python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
    ;;
  run)
    shift
    [[ $# -gt 0 ]] || { echo "usage: $0 run llama3-jax COMMAND ARGS..." >&2; exit 2; }
    cmd=$(printf '%q ' "$@")
    # the .venv's bin first, so `llama3-jax` is the checkout's; the pid is kept for `stop`, the log in /tmp
    on_all_workers "cd $REMOTE_DIR && PATH=\$PWD/.venv/bin:\$PATH \
sh -c 'echo \$\$ > /tmp/llama3-jax.pid; exec \"\$@\"' sh $cmd 2>&1 | tee /tmp/llama3-jax.log"
    ;;
  stop)
    on_all_workers "kill -TERM \$(cat /tmp/llama3-jax.pid) 2>/dev/null || true"
    ;;
  *)
    echo "usage: $0 setup | run llama3-jax COMMAND ARGS... | stop   (env: TPU_NAME, ZONE, PROJECT)" >&2
    exit 2
    ;;
esac
