#!/usr/bin/env bash
# The main job end to end on text already on this machine (no downloads):
#   docstrings/docs of the installed Python -> Pile-format jsonl -> byte-level BPE tokenizer ->
#   tools/preprocess_data.py -> pretrain_spiral.py (small SpiralFormer, validation every 50 steps)
#   -> checkpoint. CPU: ~10 minutes on 2 cores; a GPU is used when present.
# Environment overrides: OUT (output dir), ITERS, NPROC (torchrun processes), DEMO_MB (corpus MB).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
py="$root/.venv/bin/python"
out="${OUT:-$root/demo_output}"
iters="${ITERS:-300}"
nproc="${NPROC:-1}"
mkdir -p "$out"
step() { printf '\n=== %s ===\n' "$*"; }

step "1/4 corpus: docstrings and docs of the installed Python packages (Pile-format jsonl)"
if [ ! -s "$out/corpus.jsonl" ]; then
  "$py" "$root/tools/build_demo_corpus.py" --output "$out/corpus.jsonl" --max-mb "${DEMO_MB:-8}"
else
  echo "reusing $out/corpus.jsonl"
fi

step "2/4 tokenizer: byte-level BPE trained on the corpus"
if [ ! -s "$out/tokenizer/tokenizer.json" ]; then
  "$py" "$root/tools/train_tokenizer.py" --input "$out/corpus.jsonl" --type bpe \
    --vocab-size 4096 --output-dir "$out/tokenizer"
else
  echo "reusing $out/tokenizer/tokenizer.json"
fi

step "3/4 preprocess: jsonl -> Megatron indexed datasets"
"$py" "$root/tools/preprocess_data.py" --input "$out/corpus.jsonl" \
  --output-prefix "$out/data/demo" --json-keys text --append-eod --workers 2 \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$out/tokenizer/tokenizer.json"

step "4/4 pretrain: SpiralFormer 1+2x{1/4,1/2,1}+1, d=192, seq 256, ${iters} iterations"
# The recipe is spelled out: pretrain_spiral.py takes Megatron-LM's defaults (linear decay to 0,
# Adam beta2 0.999, eval-iters 100, log-interval 100) for every flag not given.
rm -rf "$out/checkpoints" "$out/tensorboard"
launcher=("$py")
if [ "$nproc" -gt 1 ]; then launcher=("$root/.venv/bin/torchrun" --nproc_per_node="$nproc"); fi
"${launcher[@]}" "$root/pretrain_spiral.py" \
  --preset tiny --spiral-layout "1+2x{1/4,1/2,1}+1" --spiral-topology mesh \
  --hidden-size 192 --num-attention-heads 4 --seq-length 256 \
  --micro-batch-size 8 --global-batch-size 16 --train-iters "$iters" \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 \
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.01 --clip-grad 1.0 \
  --eval-interval 50 --eval-iters 4 --log-interval 10 \
  --data-path "$out/data/demo_text_document" --split 98,2,0 \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$out/tokenizer/tokenizer.json" \
  --save "$out/checkpoints" --save-interval 100 --tensorboard-dir "$out/tensorboard" \
  2>&1 | tee "$out/train.log"

cat <<EOF

Done.
  checkpoint   : $out/checkpoints  (latest: iter_$(printf %07d "$(cat "$out/checkpoints/latest_checkpointed_iteration.txt")"))
  training log : $out/train.log
  summary      : $out/checkpoints/run_summary.json
  tensorboard  : $root/.venv/bin/tensorboard --logdir $out/tensorboard
Next:
  resume / continue training : add --load $out/checkpoints (and a larger --train-iters) to the command above
  generate text              : $py $root/tools/generate.py --load $out/checkpoints --prompt "def main(" --max-new-tokens 40
  export to Hugging Face     : $py $root/tools/convert_checkpoint.py --load $out/checkpoints --save-hf $out/hf
  model report               : $py $root/tools/model_report.py --preset spiral-b-160m-mesh
  scale up on GPUs           : examples/slurm/ (see docs/training.md)
EOF
