#!/usr/bin/env bash
# Shared launcher for the sbatch scripts: one torchrun per node, c10d rendezvous on the first node.
# Every Table 1 run uses the paper's App. F recipe: seq 4096, global batch 512, AdamW
# (0.9, 0.95, wd 0.01), cosine to 10% with 1% warmup, BF16.
set -euo pipefail
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
DATA_PATH="${DATA_PATH:?set DATA_PATH to the preprocessed Pile prefix (see README, Data)}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the GPT-NeoX-20B tokenizer.json}"
RUN_DIR="${RUN_DIR:-$REPO/runs/$PRESET}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TRAIN_TOKENS="${TRAIN_TOKENS:-250000000000}"          # one epoch of the deduplicated Pile (250B)
GLOBAL_BATCH=512
SEQ=4096
TRAIN_ITERS=$(( TRAIN_TOKENS / (GLOBAL_BATCH * SEQ) ))

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=8
# torchrun forwards SLURM's SIGTERM to the training processes and then waits this long for them
# (they agree, save, exit 0) before SIGKILL; the default 30 s is too short for a large checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240
export CUDA_DEVICE_MAX_CONNECTIONS=1

srun --kill-on-bad-exit=1 bash -c "
  $REPO/.venv/bin/torchrun \
    --nnodes=$SLURM_JOB_NUM_NODES --nproc_per_node=$GPUS_PER_NODE \
    --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$head_node:29500 \
    $REPO/pretrain_spiral.py \
      --preset $PRESET \
      --seq-length $SEQ --micro-batch-size ${MICRO_BATCH:-4} --global-batch-size $GLOBAL_BATCH \
      --train-iters $TRAIN_ITERS --lr ${LR:-6e-4} --lr-decay-style cosine --lr-warmup-fraction 0.01 \
      --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
      --tensor-model-parallel-size ${TP:-1} ${SP_FLAG:-} --use-distributed-optimizer --overlap-grad-reduce \
      --data-path $DATA_PATH --split 949,50,1 \
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model $TOKENIZER_MODEL \
      --save $RUN_DIR/checkpoints --load $RUN_DIR/checkpoints --save-interval 1000 \
      --eval-interval 1000 --eval-iters 10 --log-interval 10 \
      --tensorboard-dir $RUN_DIR/tensorboard \
      --exit-signal-handler --exit-duration-in-mins ${EXIT_MINS:-1430}
"
