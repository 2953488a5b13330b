#!/usr/bin/env bash
# End-to-end on one CUDA GPU, no downloads: a random-init BERT-base (SimCSE's architecture; throughput does not
# depend on the weights) with a BERT WordPiece tokenizer from $TOKENIZER_DIR.
#  1. benchmarks/scaling.py: step-time breakdown and sentences/s per loss, batch 64, bf16, max_len 32;
#  2. `trainer train` with simcse_bert_base.yaml through the fused Triton kernel: loss, STS-B dev, throughput;
#  3. the same training with model.compile=true (throughput only).
# Usage: TOKENIZER_DIR=path/to/bert-tokenizer OUT=benchmarks/results bash benchmarks/gpu_e2e.sh
set -euo pipefail
OUT=${OUT:-benchmarks/results}
TOK=${TOKENIZER_DIR:?set TOKENIZER_DIR to a folder holding a BERT tokenizer}
WORK=$(mktemp -d)
mkdir -p "$OUT"
python - "$TOK" "$WORK/bert-base-random" <<'PY'
import sys, torch
from transformers import AutoTokenizer, BertConfig, BertModel
torch.manual_seed(0)
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
BertModel(BertConfig()).save_pretrained(sys.argv[2])
PY
for loss in infonce softcse iftcl; do
  python benchmarks/scaling.py --model "$WORK/bert-base-random" --pooler cls_mlp --batch-size 64 --loss "$loss" \
    --mixed-precision bf16 --steps 30 --output "$OUT/scaling_gpu_$loss.json"
done
python -m trainer train --config launch_configs/runs/simcse_bert_base.yaml "model.name_or_path=$WORK/bert-base-random" \
  data.train=data/wiki1m_head10k.txt data.num_workers=2 eval.sts_dir=data/sts eval.every_steps=100 \
  "eval.final_tasks=[stsb_dev]" optim.max_steps=300 tracking.enabled=false "output_dir=$WORK/run" loss.kernel=triton
cp "$WORK/run/metrics.jsonl" "$OUT/gpu_train_metrics.jsonl"
# 3. the same run with model.compile=true (torch.compile of the backbone; no faster on the 2-core CPU, GPU still
#    to confirm): compare throughput/sentences_per_s after the first log window with step 2's.
python -m trainer train --config launch_configs/runs/simcse_bert_base.yaml "model.name_or_path=$WORK/bert-base-random" \
  data.train=data/wiki1m_head10k.txt data.num_workers=2 eval.sts_dir= optim.max_steps=300 tracking.enabled=false \
  "output_dir=$WORK/run_compiled" loss.kernel=triton model.compile=true
cp "$WORK/run_compiled/metrics.jsonl" "$OUT/gpu_train_metrics_compiled.jsonl"
