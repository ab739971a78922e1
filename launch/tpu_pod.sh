#!/usr/bin/env bash
# Train jdiff on a Cloud TPU VM pod slice: one process per TPU host, all running the same
# command; jax.distributed finds the other hosts itself (--coordinator=auto), the global batch
# is split over every chip of the slice, and orbax writes each host's shards of the checkpoint.
#
# This script only wraps gcloud; nothing in the test suite runs it. Usage:
#
#   launch/tpu_pod.sh create   NAME ZONE ACCELERATOR [RUNTIME]   # e.g. my-pod us-central2-b v4-32
#   launch/tpu_pod.sh setup    NAME ZONE REPO_URL                # clone + pip install on every host
#   launch/tpu_pod.sh train    NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh sample   NAME ZONE WORKDIR OUT [flags ...] # OUT written by host 0
#   launch/tpu_pod.sh delete   NAME ZONE
#
# The commands it runs, spelled out (v4-32 = 4 hosts x 4 chips). WORKDIR must be a directory
# every host sees with the same contents: a Filestore/NFS mount or a gcsfuse-mounted bucket
# (jdiff writes its logs with plain file I/O; every host writes its own checkpoint shards):
#
#   gcloud compute tpus tpu-vm create my-pod --zone=us-central2-b \
#       --accelerator-type=v4-32 --version=tpu-ubuntu2204-base
#   gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all --command="
#       git clone REPO_URL jdiff && cd jdiff && pip install -U 'jax[tpu]' && pip install -e ."
#   gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all --command="
#       cd jdiff && python -m launch.train --config configs/cifar10_ddpm.py \
#           --workdir /mnt/shared/cifar10_ddpm --coordinator=auto"
#   gcloud compute tpus tpu-vm delete my-pod --zone=us-central2-b
#
# --worker=all starts the command on every host at once; each host's process reads its own
# slice of every global batch (jdiff.data.batch_at with its process index), so
# config.data.batch_size must be a multiple of the total number of chips. Only process 0
# writes logs, metrics and sample grids. Large models: add --fsdp to shard params and
# optimizer state over the chips. Without auto-detection (other clusters), give every host
# --coordinator=HOST0_IP:1234 --num_processes=N --process_id=I instead of --coordinator=auto.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

cmd=${1:-}; [[ -n "$cmd" ]] || usage; shift
case "$cmd" in
  create)
    [[ $# -ge 3 ]] || usage
    name=$1 zone=$2 accel=$3 runtime=${4:-tpu-ubuntu2204-base}
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" --version="$runtime"
    ;;
  setup)
    [[ $# -eq 3 ]] || usage
    name=$1 zone=$2 repo=$3
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
      set -e
      [ -d jdiff ] || git clone '$repo' jdiff
      cd jdiff && pip install -U 'jax[tpu]' && pip install -e ."
    ;;
  train)
    [[ $# -ge 4 ]] || usage
    name=$1 zone=$2 config=$3 workdir=$4; shift 4
    extra=""; [[ $# -eq 0 ]] || extra=$(printf ' %q' "$@")
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
      cd jdiff && python -m launch.train --config '$config' --workdir '$workdir' --coordinator=auto$extra"
    ;;
  sample)
    [[ $# -ge 4 ]] || usage
    name=$1 zone=$2 workdir=$3 out=$4; shift 4
    extra=""; [[ $# -eq 0 ]] || extra=$(printf ' %q' "$@")
    # Every host takes part (a pod slice's chips run one program); process 0 writes OUT.
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
      cd jdiff && python -m launch.sample --workdir '$workdir' --out '$out' --coordinator=auto$extra"
    ;;
  delete)
    [[ $# -eq 2 ]] || usage
    gcloud compute tpus tpu-vm delete "$1" --zone="$2" --quiet
    ;;
  *) usage ;;
esac
