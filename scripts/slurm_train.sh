#!/usr/bin/env bash
# Multi-node DDP training on SLURM with shards in object storage (see docs/scaling.md).
#   sbatch --nodes 8 scripts/slurm_train.sh s3://bucket/imagenet   # expects <uri>/train and <uri>/val shards
# One task per GPU; Lightning reads the SLURM environment (ranks, master address) itself.
#SBATCH --job-name=vit-train
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
set -euo pipefail
SHARDS="${1:?usage: sbatch scripts/slurm_train.sh s3://bucket/dataset [extra vit-train args]}"
shift
export LITDATA_CACHE_DIR="${LITDATA_CACHE_DIR:-/tmp/$USER/litdata}"  # node-local disk for the chunk cache
RUNS="${RUNS:-$PWD/runs/deit_small}"  # a path every node sees, so --ckpt_path last finds the run

srun vit-train fit --config configs/imagenet_deit_small.yaml \
  --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" \
  --trainer.default_root_dir "$RUNS" \
  --data.train_dir "$SHARDS/train" --data.val_dir "$SHARDS/val" \
  --data.num_workers $(( SLURM_CPUS_PER_TASK - 2 )) "$@"
