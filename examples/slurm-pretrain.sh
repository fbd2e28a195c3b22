#!/bin/bash
# Libra pretraining on several nodes with SLURM: one torchrun per node, FSDP2 over every GPU.
#   sbatch examples/slurm-pretrain.sh
# Adjust the resources, the data and the out dir; see docs/scale.md.
#SBATCH --job-name=libra-pretrain
#SBATCH --nodes=5
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=8

# --resume continues the run in --out-dir from its newest complete checkpoint (or starts it):
# resubmitting the same script after a time-out or a failed node goes on from there, on any
# number of nodes (sharded checkpoints re-shard; keep nodes x GPUs x --batch-size x --grad-accum).
srun torchrun \
    --nnodes="$SLURM_NNODES" --nproc-per-node=8 \
    --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$head_node:29500" \
    -m libra_cli.lm train shards/ \
    --init-from meta-llama/Llama-2-7b-chat-hf --parallel fsdp \
    --out-dir runs/pretrain --save-every 1000 --resume
