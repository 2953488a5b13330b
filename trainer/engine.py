"""The training loop, top to bottom: Accelerate prepare -> accumulate / backward / clip / step / schedule ->
STS-B dev eval every N steps keeping the best model -> atomic checkpoints -> exact resume.

One step of unsupervised SimCSE: each local sentence is encoded twice in one forward pass (two dropout masks),
view-2 embeddings of every rank are gathered with gradient (`distributed.gather_with_grad`), and the loss
scores local anchors against all candidates with the positive at `rank * B_local + i`. IFTCL adds a third,
token-augmented (fraternal) view and a queue of past candidates.

Checkpoint = `checkpoints/step_XXXXXXXX/` holding `state/` (Accelerate: model, optimizer, scheduler, RNG),
`model/` (a `SentenceEncoder.save` folder), `objective.pt` (queue) and `trainer_state.json` (step, data
position, best score, MLflow run id). It is written under a temporary name and renamed when complete, so a
crash never leaves a half-written checkpoint that `--resume` could pick.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from trainer import distributed as dist
from trainer.config import TrainConfig, flatten, save_config
from trainer.errors import UserError

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
KEEP_CHECKPOINTS = 2


@dataclass
class TrainResult:
    """What `train` returns (also the tail of `<output_dir>/metrics.jsonl`)."""

    step: int = 0
    best_score: Optional[float] = None
    initial_score: Optional[float] = None
    final_scores: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)
    """(step, loss) of every optimizer step of this invocation."""
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    wall_s: float = 0.0


# ----------------------------------------------------------------------------------------------------------
# Small pieces


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return fn


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def _view(batch: dict, prefix: str = "") -> dict:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[prefix + k] for k in keys if prefix + k in batch}


def _checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file())


def find_last_checkpoint(output_dir: str | Path) -> Optional[Path]:
    found = _checkpoints(Path(output_dir))
    return found[-1] if found else None


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    on_cpu = not torch.cuda.is_available()
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    # gloo on CPU; passing a backend to a single process makes Accelerate expect a process group it never starts.
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and expected > 1 else []
    # Accelerate only sees the torchrun world on CPU when told `cpu=True` (PLATFORM.md); a silent
    # single-process run would train on 1/W of the data, so check the world size against the launcher's.
    # Under a DeepSpeed launch `cpu=True` would silently drop DeepSpeed (plain DDP): never pass it there.
    dist.skip_deepspeed_cpu_jit_ops()
    accelerator = Accelerator(
        cpu=on_cpu and not dist.deepspeed_requested(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        kwargs_handlers=kwargs,
    )
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"Accelerate started {accelerator.num_processes} process(es) but the launcher set WORLD_SIZE={expected}"
        )
    return accelerator


def _evaluate(model, cfg: TrainConfig, tasks: list[str]) -> dict[str, float]:
    from trainer.evaluate import evaluate_sts

    return evaluate_sts(model, cfg.eval.sts_dir, tasks=tasks, batch_size=cfg.eval.batch_size, progress=False)


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(
    cfg: TrainConfig,
    *,
    resume: bool | str = False,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> TrainResult:
    """Train as configured. `resume=True` continues from the last checkpoint in `output_dir` (a path: from that
    checkpoint). `on_step(step, loss)` is called on every rank after each optimizer step (tests use it to
    simulate a crash)."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from trainer.data import TrainStream, make_fraternal, prepare_train_source
    from trainer.losses import build_objective
    from trainer.model import build_encoder
    from trainer.tracking import Tracker, ui_command

    started = time.perf_counter()
    output_dir = Path(cfg.output_dir).resolve()
    # An empty eval.sts_dir turns evaluation off (pretraining runs with no STS data at hand).
    eval_enabled = bool(cfg.eval.sts_dir)
    if eval_enabled and not Path(cfg.eval.sts_dir).is_dir():
        raise UserError(f"eval.sts_dir does not exist: {cfg.eval.sts_dir} (set eval.sts_dir= to train without eval)")

    accelerator = _make_accelerator(cfg)
    main = accelerator.is_main_process
    checkpoint = None
    if resume:
        checkpoint = Path(resume) if isinstance(resume, (str, Path)) else find_last_checkpoint(output_dir)
        if checkpoint is None or not (checkpoint / STATE_FILE).is_file():
            raise UserError(f"--resume: no complete checkpoint found in {output_dir / 'checkpoints'}")
    elif main and _checkpoints(output_dir):
        raise UserError(
            f"{output_dir} already holds checkpoints; pass --resume to continue that run or choose another output_dir"
        )
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    accelerator.wait_for_everyone()

    from accelerate.utils import set_seed

    # Same seed on every rank: identical init; dropout differs per rank anyway because inputs differ.
    set_seed(cfg.seed)
    model = build_encoder(cfg.model)
    objective = build_objective(cfg.loss)
    fraternal = make_fraternal(cfg.data.augment) if objective.needs_fraternal else None
    # A text corpus is sharded into output_dir/shards here, before the stream (which only reads shards).
    train_source = prepare_train_source(cfg.data, output_dir, progress=main)
    stream = TrainStream(
        replace(cfg.data, train=train_source),
        model.tokenizer,
        max_length=cfg.model.max_length,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        work_dir=output_dir,
        fraternal=fraternal,
    )
    optimizer = _optimizer(model, cfg)
    # The scheduler is stepped by hand once per optimizer step: Accelerate's prepared scheduler steps
    # num_processes times per call, which would end the schedule W times too early.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.optim.warmup_steps, cfg.optim.max_steps))
    # DeepSpeed: micro batch from data.batch_size (no DataLoader is prepared), clipping = optim.max_grad_norm.
    dist.configure_deepspeed(accelerator, micro_batch_size=cfg.data.batch_size, max_grad_norm=cfg.optim.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)

    state = {"step": 0, "best_score": None, "initial_score": None, "run_id": None, "data": None}
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint / "state"))
        state.update(json.loads((checkpoint / STATE_FILE).read_text()))
        stream.load_state_dict(state["data"])
        objective_file = checkpoint / "objective.pt"
        if objective_file.is_file():
            objective.load_state_dict(torch.load(objective_file, map_location="cpu"))
        log.info("resumed from %s at step %d", checkpoint, state["step"])

    tracker = Tracker(cfg.tracking, output_dir, active=main, run_id=state["run_id"])
    state["run_id"] = tracker.run_id
    if checkpoint is None:
        tracker.log_params(flatten(cfg))
        tracker.log_params({"world_size": accelerator.num_processes, "global_batch": cfg.data.batch_size * accelerator.num_processes})
        tracker.log_artifact(output_dir / "config.yaml")
    metrics_file = output_dir / "metrics.jsonl"

    def record(metrics: dict, step: int) -> None:
        tracker.log_metrics(metrics, step)
        if main:  # a local copy survives any tracking outage
            with open(metrics_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def save_best(step: int) -> None:
        if main:
            tmp = output_dir / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped.save(tmp)
            (tmp / "step.txt").write_text(str(step))
            _atomic_replace_dir(tmp, output_dir / "best")
        accelerator.wait_for_everyone()

    def eval_and_keep(step: int) -> float:
        # Every rank evaluates (identical result): under ZeRO-3 all ranks must join the forward anyway.
        score = _evaluate(unwrapped, cfg, ["stsb_dev"])["stsb_dev"]
        model.train()
        record({"eval/stsb_dev": score}, step)
        if cfg.eval.keep_best and (state["best_score"] is None or score > state["best_score"]):
            state["best_score"] = score
            save_best(step)
        return score

    def save_checkpoint(step: int) -> None:
        root = output_dir / "checkpoints"
        tmp, final = root / f".tmp_step_{step:08d}", root / f"step_{step:08d}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"))
        # Every rank writes its own RNG state (and ZeRO shards) into tmp; save_state ends without a barrier, so
        # rank 0 must not rename tmp until all of them are done (a slow rank 1 then found its folder gone).
        accelerator.wait_for_everyone()
        if main:
            unwrapped.save(tmp / "model")
            torch.save(objective.state_dict(), tmp / "objective.pt")
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "data": stream.state_dict()}, indent=2))
            _atomic_replace_dir(tmp, final)
            for old in _checkpoints(output_dir)[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    result = TrainResult(run_id=tracker.run_id, tracking_uri=tracker.uri)
    step = state["step"]
    if checkpoint is None and eval_enabled:
        state["initial_score"] = eval_and_keep(0)
        if main:
            log.info("STS-B dev before training: %.2f", state["initial_score"])

    model.train()
    data_iter = iter(stream)
    window_loss, window_sent, window_t0 = [], 0, time.perf_counter()
    bar = tqdm(total=cfg.optim.max_steps, initial=step, desc="train", disable=not main, dynamic_ncols=True)
    status = "FAILED"
    try:
        while step < cfg.optim.max_steps:
            for _ in range(cfg.optim.grad_accum):
                try:
                    batch = next(data_iter)
                except StopIteration:  # end of an epoch: the stream reshuffles for the next one
                    data_iter = iter(stream)
                    batch = next(data_iter)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    out = _step_loss(model, batch, objective, accelerator)
                    accelerator.backward(out["loss"])
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                objective.enqueue(out.pop("_candidates"))
                window_loss.append(out["loss"].detach())
                window_sent += batch["input_ids"].shape[0] * accelerator.num_processes
            scheduler.step()
            step += 1
            loss_value = dist.all_reduce_mean(torch.stack(window_loss[-cfg.optim.grad_accum :]).mean()).item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}")
            result.losses.append((step, loss_value))
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.optim.max_steps:
                elapsed = time.perf_counter() - window_t0
                mean_loss = dist.all_reduce_mean(torch.stack(window_loss).mean()).item()
                extras = {f"train/{k}": float(v) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}
                record(
                    {
                        "train/loss": mean_loss,
                        "train/lr": scheduler.get_last_lr()[0],
                        "throughput/sentences_per_s": window_sent / max(elapsed, 1e-9),
                        **extras,
                    },
                    step,
                )
                window_loss, window_sent, window_t0 = [], 0, time.perf_counter()
            if on_step is not None:
                on_step(step, loss_value)
            evaluated = eval_enabled and cfg.eval.every_steps and step % cfg.eval.every_steps == 0
            if evaluated:
                eval_and_keep(step)
                window_t0 = time.perf_counter()  # keep eval time out of the throughput figure
            if evaluated or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save_checkpoint(step)
        bar.close()
        if eval_enabled and not (cfg.eval.every_steps and step % cfg.eval.every_steps == 0):
            eval_and_keep(step)
        last = find_last_checkpoint(output_dir)
        if last is None or last.name != f"step_{step:08d}":
            save_checkpoint(step)
        status = "FINISHED"
    finally:
        bar.close()
        if status != "FINISHED":
            tracker.finish("FAILED")

    final_model_dir = output_dir / "best" if (output_dir / "best").is_dir() else find_last_checkpoint(output_dir) / "model"
    result.final_scores = _final_report(cfg, final_model_dir, tracker, main)
    accelerator.wait_for_everyone()
    tracker.finish("FINISHED")
    result.step, result.best_score, result.initial_score = step, state["best_score"], state["initial_score"]
    result.wall_s = time.perf_counter() - started
    if main:
        _print_summary(result, output_dir, ui_command(tracker.uri))
    accelerator.end_training()
    return result


def _step_loss(model, batch: dict, objective, accelerator) -> dict:
    """Encode the views, gather candidates across ranks, score local anchors against them."""
    # Both dropout views in ONE forward: same masks as two calls (different dropout draws per row copy), half
    # the launches.
    views = {k: torch.cat([v, v]) for k, v in _view(batch).items()}
    emb = model(**views)
    num_local = batch["input_ids"].shape[0]
    anchors, positives = emb[:num_local], emb[num_local:]
    candidates = dist.gather_with_grad(positives)
    positive_index = torch.arange(num_local, device=emb.device) + accelerator.process_index * num_local
    fraternal = None
    if objective.needs_fraternal:
        fraternal = dist.gather_with_grad(model(**_view(batch, "fraternal_")))
    out = objective(anchors, candidates, positive_index=positive_index, fraternal=fraternal)
    out["_candidates"] = candidates.detach()
    return out


def _final_report(cfg: TrainConfig, model_dir: Path, tracker, main: bool) -> dict:
    """Evaluate the kept model on `eval.final_tasks`, log the table, export for sentence-transformers."""
    if not main:
        return {}
    from trainer.model import SentenceEncoder

    model = SentenceEncoder.load(model_dir)
    scores = _evaluate(model, cfg, list(cfg.eval.final_tasks)) if cfg.eval.final_tasks and cfg.eval.sts_dir else {}
    if scores:
        tracker.log_metrics({f"sts/{k}": v for k, v in scores.items()}, step=0)
        table = "| task | Spearman x100 |\n|---|---|\n" + "".join(f"| {k} | {v:.2f} |\n" for k, v in scores.items())
        tracker.log_text(table, "sts_results.md")
        (Path(cfg.output_dir) / "sts_results.json").write_text(json.dumps(scores, indent=2))
    try:
        from trainer.export import export
    except ImportError:  # pragma: no cover - export module missing in a partial install
        return scores
    export_dir = export(model_dir, Path(cfg.output_dir) / "export")
    tracker.log_artifact(export_dir, "export")
    return scores


def _print_summary(result: TrainResult, output_dir: Path, ui: str) -> None:
    def fmt(x):
        return "n/a" if x is None else f"{x:.2f}"

    lines = [
        f"\nDone: {result.step} steps in {result.wall_s / 60:.1f} min. STS-B dev (Spearman x100): "
        f"before {fmt(result.initial_score)}, best {fmt(result.best_score)}.",
        f"Outputs: {output_dir}",
    ]
    for name, label in (("best", "best model"), ("export", "sentence-transformers export"), ("checkpoints", "checkpoints")):
        if (output_dir / name).exists():
            lines.append(f"  {label}: {output_dir / name}")
    if result.run_id:
        lines += [f"MLflow run {result.run_id} at {result.tracking_uri}", f"  view it: {ui}"]
    else:
        lines.append("MLflow: off")
    print("\n".join(lines), flush=True)
