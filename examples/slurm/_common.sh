#!/usr/bin/env bash
# Shared launcher for the sbatch scripts: one srun task per node, each running launch_node.sh
# (torchrun, one process per GPU, c10d rendezvous on the first node).
#
# Run shape from the environment (all but DATA_PATH/TOKENIZER_MODEL have defaults):
#   PRESET, DATA_PATH, TOKENIZER_MODEL, RUN_DIR (checkpoints/, tensorboard/), LR (peak; per-size
#   default in each sbatch file), MICRO_BATCH, TP, SP_FLAG, TRAIN_TOKENS, EXIT_MINS,
#   GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE), MASTER_PORT (default: derived from the job id),
#   EXTRA_ARGS (appended last, so any flag below can be overridden: argparse keeps the last value).
#
# The recipe is the paper's App. F (every Table 1 run), spelled out because pretrain_spiral.py
# takes Megatron-LM's defaults: seq 4096, global batch 512, AdamW (0.9, 0.95, wd 0.01), cosine
# decay to 10% of the peak LR with 1% linear warmup, clip 1.0, BF16; split 949,50,1.
set -euo pipefail
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
PRESET="${PRESET:?set PRESET (e.g. spiral-b-160m-mesh; see tools/model_report.py)}"
DATA_PATH="${DATA_PATH:?set DATA_PATH to the preprocessed Pile prefix (see docs/training.md)}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the GPT-NeoX-20B tokenizer.json}"
RUN_DIR="${RUN_DIR:-$REPO/runs/$PRESET}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:?set GPUS_PER_NODE (SLURM_GPUS_ON_NODE is unset: submit with --gpus-per-node)}}"
# A port per job: two jobs sharing a first node must not collide on a fixed 29500.
MASTER_PORT="${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 40000 ))}"
CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-$(nproc)}"
LR="${LR:-6e-4}"
MIN_LR="${MIN_LR:-$(awk -v lr="$LR" 'BEGIN { printf "%.6g", lr / 10 }')}"   # paper: 10% of the peak
TRAIN_TOKENS="${TRAIN_TOKENS:-250000000000}"          # one epoch of the deduplicated Pile (250B)
GLOBAL_BATCH="${GLOBAL_BATCH:-512}"
SEQ="${SEQ:-4096}"
TRAIN_ITERS="${TRAIN_ITERS:-$(( TRAIN_TOKENS / (GLOBAL_BATCH * SEQ) ))}"
read -r -a extra <<< "${EXTRA_ARGS:-}"

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
mkdir -p "$RUN_DIR/checkpoints"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CPUS_PER_TASK / GPUS_PER_NODE > 0 ? CPUS_PER_TASK / GPUS_PER_NODE : 1 ))}"
# torchrun waits this long for the ranks to finish their exit-signal save before SIGKILL.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NPROC_PER_NODE="$GPUS_PER_NODE"

# Slurm >= 22.05 no longer hands sbatch's --cpus-per-task to srun: pass it, or every rank of a
# node shares one core.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" \
  bash "$REPO/examples/slurm/launch_node.sh" \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_node:$MASTER_PORT" \
    "$REPO/pretrain_spiral.py" \
      --preset "$PRESET" \
      --seq-length "$SEQ" --micro-batch-size "${MICRO_BATCH:-4}" --global-batch-size "$GLOBAL_BATCH" \
      --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine \
      --lr-warmup-fraction 0.01 --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 \
      --clip-grad 1.0 --bf16 \
      --tensor-model-parallel-size "${TP:-1}" ${SP_FLAG:-} --use-distributed-optimizer --overlap-grad-reduce \
      --data-path "$DATA_PATH" --split 949,50,1 \
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
      --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval 1000 \
      --eval-interval 1000 --eval-iters 10 --log-interval 10 \
      --tensorboard-dir "$RUN_DIR/tensorboard" \
      --exit-signal-handler --exit-duration-in-mins "${EXIT_MINS:-1430}" \
      "${extra[@]}"
