"""The training loop, top to bottom: set-up -> accumulate / backward / clip / step / schedule -> STS-B dev eval
every N steps keeping the best model -> atomic checkpoints -> exact resume -> final report and export.

One micro-batch (forward, gather, loss, backward; plain or with cached gradients in chunks of
`optim.mini_batch_size`) is `trainer.step.forward_backward`: each local sentence is encoded twice in one forward
pass (two dropout masks), view-2 embeddings of every rank are gathered with gradient, and the loss scores local
anchors against all candidates with the positive at `rank * B_local + i`. IFTCL adds a third, token-augmented
(fraternal) view and a queue of past candidates, which the loop fills after each backward. Pair data (anchor,
positive, hard negatives) takes `trainer.pair_step.pair_step_loss` instead, batch by batch (a `data.sources`
mixture may alternate text and pair batches).

The Accelerator, optimizer and schedule come from `trainer.runtime`; checkpoints, their layout and the kept
best model from `trainer.checkpoint`; the output folder's lock, named write failures and the metrics rewind
on resume from `trainer.outputs`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from trainer import distributed as dist
from trainer import runtime
from trainer.checkpoint import Checkpointer, TrainState, find_last_checkpoint
from trainer.config import TrainConfig, flatten, save_config
from trainer.errors import UserError
from trainer.outputs import OutputLock, rewind_metrics, writing
from trainer.step import accelerate_backprop, forward_backward

__all__ = ["TrainResult", "find_last_checkpoint", "train"]

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


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
    """Where the run was tracked, credentials redacted."""
    wall_s: float = 0.0


class _Metrics:
    """Metrics go to the tracker and, on rank 0, to `metrics.jsonl`: a local copy survives any tracking outage."""

    def __init__(self, tracker: Any, path: Path, main: bool) -> None:
        self.tracker, self.path, self.main = tracker, path, main

    def record(self, metrics: dict, step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        if self.main:
            with writing("metrics", self.path), open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")


class _Window:
    """Micro-batch losses and sentences since the last train-metrics line (every `log_every` steps)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.sentences = 0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach())

    def step_loss(self, num_micro: int) -> float:
        """The last optimizer step's loss, averaged over its micro-batches and all ranks (a collective)."""
        return dist.all_reduce_mean(torch.stack(self.losses[-num_micro:]).mean()).item()

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def flush(self, lr: float) -> dict[str, float]:
        """The window's mean loss (over all ranks: a collective), LR and throughput; starts a new window."""
        elapsed = time.perf_counter() - self.t0
        metrics = {
            "train/loss": dist.all_reduce_mean(torch.stack(self.losses).mean()).item(),
            "train/lr": lr,
            "throughput/sentences_per_s": self.sentences / max(elapsed, 1e-9),
        }
        self._reset()
        return metrics


@dataclass
class _Run:
    """Everything one training invocation works with, built by `_setup`."""

    cfg: TrainConfig
    accelerator: Any
    prep: runtime.Prepared
    objective: Any
    stream: Any
    checkpointer: Checkpointer
    tracker: Any
    metrics: _Metrics
    state: TrainState
    resumed_from: Optional[Path]

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def evaluate(self, step: int) -> float:
        """STS-B dev score of the current model, recorded; replaces `best/` when it is the best so far."""
        # Every rank evaluates (identical result): under ZeRO-3 all ranks must join the forward anyway.
        score = _evaluate(self.prep.unwrapped, self.cfg, ["stsb_dev"])["stsb_dev"]
        self.prep.model.train()
        self.metrics.record({"eval/stsb_dev": score}, step)
        if self.cfg.eval.keep_best and (self.state.best_score is None or score > self.state.best_score):
            self.state.best_score = score
            self.checkpointer.save_best(step, self.prep.unwrapped)
        return score

    def save(self) -> None:
        self.checkpointer.save(self.state, model=self.prep.unwrapped, objective=self.objective, stream=self.stream,
                               scheduler=self.prep.scheduler)


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(
    cfg: TrainConfig,
    *,
    resume: bool | str = False,
    on_step: Optional[Callable[[int, float], None]] = None,
    progress: bool = True,
) -> TrainResult:
    """Train as configured. `resume=True` continues from the last checkpoint in `output_dir` (a path: from that
    checkpoint). `on_step(step, loss)` is called on every rank after each optimizer step (tests use it to
    simulate a crash). `progress=False`: no progress bar nor progress lines (`train --no-progress`). Rank 0 holds
    `<output_dir>/.run.lock` until it returns: a second run there stops at once."""
    started = time.perf_counter()
    lock = OutputLock(Path(cfg.output_dir).resolve())
    try:
        run = _setup(cfg, resume, lock, progress)
        return _train(run, started, on_step, progress)
    finally:
        lock.release()


def _train(run: _Run, started: float, on_step: Optional[Callable[[int, float], None]], progress: bool) -> TrainResult:
    """Initial eval, the steps, the last eval and checkpoint, the final report and summary."""
    cfg = run.cfg
    result = TrainResult(run_id=run.tracker.run_id, tracking_uri=run.tracker.display_uri)
    if run.resumed_from is None and cfg.eval.enabled:
        run.state.initial_score = run.evaluate(0)
        if run.main:
            log.info("STS-B dev before training: %.2f", run.state.initial_score)

    finished = False
    try:
        _train_steps(run, result, on_step, progress)
        if cfg.eval.enabled and not cfg.eval.due(run.state.step):
            run.evaluate(run.state.step)
        if not run.checkpointer.has(run.state.step):
            run.save()
        finished = True
    finally:
        if not finished:
            run.tracker.finish("FAILED")

    with dist.whole_model_io():  # rank 0 alone loads and exports: no ZeRO-3 collective may start there
        result.final_scores = _final_report(cfg, run.checkpointer.kept_model(), run.tracker, run.main)
    run.accelerator.wait_for_everyone()
    run.tracker.finish("FINISHED")
    result.step, result.best_score, result.initial_score = run.state.step, run.state.best_score, run.state.initial_score
    result.wall_s = time.perf_counter() - started
    if run.main:
        _print_summary(result, run.checkpointer.output_dir, run.tracker)
    run.accelerator.end_training()
    return result


def _setup(cfg: TrainConfig, resume: bool | str, lock: OutputLock, progress: bool = True) -> _Run:
    """Accelerator, output folder and its lock, model, objective, data stream, `prepare`, resume, tracking."""
    from accelerate.utils import set_seed

    from trainer.data import make_fraternal, make_train_stream
    from trainer.export import check_target
    from trainer.frozen import attach_frozen
    from trainer.losses import build_objective
    from trainer.model import build_encoder, compile_backbone
    from trainer.tokenizer_choice import resolve_fast_tokenizer
    from trainer.tracking import Tracker

    output_dir = Path(cfg.output_dir).resolve()
    if cfg.eval.enabled and not Path(cfg.eval.sts_dir).is_dir():
        raise UserError(f"eval.sts_dir does not exist: {cfg.eval.sts_dir} (set eval.sts_dir= to train without eval)")
    if cfg.model.compile and dist.deepspeed_requested():
        raise UserError("model.compile is not supported under DeepSpeed (its engine wraps and hooks the modules "
                        "itself); launch without DeepSpeed or set model.compile=false")
    accelerator = runtime.make_accelerator(cfg)
    main = accelerator.is_main_process
    if main:
        with writing("the output folder", output_dir):
            output_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    checkpointer = Checkpointer(output_dir, accelerator, keep=cfg.checkpoint_keep)
    resume_from = checkpointer.resume_point(resume)
    if main:
        check_target(output_dir / "export")  # the final export must not fail after the whole run
        with writing("the run config", output_dir / "config.yaml"):
            save_config(cfg, output_dir / "config.yaml")
    accelerator.wait_for_everyone()

    # Same seed on every rank for an identical init (the cls_mlp head is random), then seed + rank: dropout
    # masks come from the RNG state, not from the inputs, so equal seeds would draw equal masks on every rank.
    set_seed(cfg.seed)
    with dist.whole_model_io():
        model = build_encoder(cfg.model)
    set_seed(cfg.seed, device_specific=True)
    objective = build_objective(cfg.loss)
    attach_frozen(objective, model, accelerator.mixed_precision)  # the initial encoder: before prepare and resume
    # A corpus is sharded into output_dir/shards here, before the stream (which only reads shards).
    fast = resolve_fast_tokenizer(cfg.data.fast_tokenizer, model, batch_size=cfg.data.batch_size,
                                  num_workers=cfg.data.num_workers, device=accelerator.device)
    if cfg.model.compile:  # after the frozen copy and the tokenizer timing: both stay eager
        compile_backbone(model)
    stream = make_train_stream(
        replace(cfg.data, fast_tokenizer=fast),
        model.tokenizer,
        max_length=cfg.model.max_length,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        work_dir=output_dir,
        fraternal=make_fraternal(cfg.data.augment) if objective.needs_fraternal else None,
        progress=main and progress,
    )
    if cfg.optim.epochs:
        cfg = _steps_from_epochs(cfg, stream, main)
    prep = runtime.prepare(accelerator, model, cfg)
    state = TrainState()
    if resume_from is not None:
        state = checkpointer.load(resume_from, objective=objective, stream=stream, scheduler=prep.scheduler)
        if main:  # the steps after the checkpoint are logged again
            rewind_metrics(output_dir / METRICS_FILE, state.step)

    tracker = Tracker(cfg.tracking, output_dir, active=main, run_id=state.run_id)
    state.run_id = tracker.run_id
    if resume_from is not None:
        # MLflow cannot delete the replaced values; readers take the latest value per step (tracking.metric_history)
        tracker.set_tags({"resumed_from_step": state.step})
    else:
        world = accelerator.num_processes
        tracker.log_params(flatten(cfg))
        tracker.log_params({"world_size": world, "global_batch": cfg.global_batch_size(world),
                            "mixed_precision_effective": accelerator.mixed_precision})
        tracker.log_artifact(output_dir / "config.yaml")
    metrics = _Metrics(tracker, output_dir / METRICS_FILE, main)
    return _Run(cfg, accelerator, prep, objective, stream, checkpointer, tracker, metrics, state, resume_from)


def _steps_from_epochs(cfg: TrainConfig, stream: Any, main: bool) -> TrainConfig:
    """`optim.epochs` -> `optim.max_steps`, from the stream's batches per rank in each epoch."""
    from trainer.config import ConfigError

    try:
        cfg = cfg.with_epochs(stream.batches_per_epoch)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if main:
        log.info("optim.epochs=%d: %d optimizer steps (%d batches per rank in epoch 0, grad_accum %d)",
                 cfg.optim.epochs, cfg.optim.max_steps, stream.batches_per_epoch(0), cfg.optim.grad_accum)
    return cfg


def _train_steps(
    run: _Run, result: TrainResult, on_step: Optional[Callable[[int, float], None]], progress: bool
) -> None:
    """Optimizer steps up to `optim.max_steps`, with logging, periodic evaluation and checkpoints."""
    from trainer.progress import StepProgress

    from trainer.data import data_metrics

    cfg, state = run.cfg, run.state
    batches = _batches(run.stream, run.accelerator.device)
    window = _Window()
    run.prep.model.train()
    bar = StepProgress(cfg.optim.max_steps, state.step, enabled=run.main and progress, every=cfg.log_every)
    try:
        while state.step < cfg.optim.max_steps:
            run.objective.log_mechanisms = cfg.log_due(state.step + 1)  # the metrics that cost a pass
            out = _optimizer_step(run, batches, window)
            state.step += 1
            loss = window.step_loss(cfg.optim.grad_accum)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {state.step}")
            result.losses.append((state.step, loss))
            bar.update(state.step, loss)
            if cfg.log_due(state.step):
                lr = run.prep.scheduler.get_last_lr()[0]
                run.metrics.record({**window.flush(lr), **_loss_logs(out), **data_metrics(run.stream)}, state.step)
            if on_step is not None:
                on_step(state.step, loss)
            if cfg.eval.due(state.step):
                run.evaluate(state.step)
                window.restart_clock()  # keep eval time out of the throughput figure
            if cfg.checkpoint_due(state.step):
                run.save()
    finally:
        bar.close()


def _optimizer_step(run: _Run, batches: Iterator[dict], window: _Window) -> dict:
    """`optim.grad_accum` micro-batches, one optimizer and scheduler step; returns the last micro-batch's
    loss dict."""
    acc, prep, optim = run.accelerator, run.prep, run.cfg.optim
    backprop = accelerate_backprop(acc, prep.model)
    for _ in range(optim.grad_accum):
        batch = next(batches)
        with acc.accumulate(prep.model):
            out, *candidates = forward_backward(prep.model, batch, run.objective, acc.process_index,
                                                mini_batch_size=optim.mini_batch_size, backprop=backprop)
            if acc.sync_gradients and optim.max_grad_norm > 0:
                acc.clip_grad_norm_(prep.model.parameters(), optim.max_grad_norm)
            prep.optimizer.step()
            prep.optimizer.zero_grad(set_to_none=True)
        # Only now: enqueue overwrites queue rows in place, and a loss may keep a view of them for its backward.
        run.objective.enqueue(*candidates)  # pair steps also hand over the candidates' text keys
        window.add(out["loss"])
    window.sentences += run.cfg.sentences_per_step(acc.num_processes)
    prep.scheduler.step()
    return out


def _loss_logs(out: dict) -> dict[str, float]:
    """The objective's scalar logs (beside the loss) as `train/<name>` metrics."""
    return {f"train/{k}": float(v) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}


def _batches(stream: Any, device: torch.device) -> Iterator[dict]:
    """Micro-batches on `device`, endlessly: at the end of an epoch the stream reshuffles for the next one."""
    while True:
        empty = True
        for batch in stream:
            empty = False
            yield {k: v.to(device) for k, v in batch.items()}
        if empty:  # TrainStream refuses data smaller than one global batch; never spin on an empty epoch
            raise RuntimeError("the training stream yielded no batch in a whole epoch")


# ----------------------------------------------------------------------------------------------------------
# Evaluation and the end of the run


def _evaluate(model, cfg: TrainConfig, tasks: list[str]) -> dict[str, float]:
    from trainer.evaluate import evaluate_sts

    return evaluate_sts(model, cfg.eval.sts_dir, tasks=tasks, batch_size=cfg.eval.batch_size, progress=False)


def _final_report(cfg: TrainConfig, model_dir: Path, tracker, main: bool) -> dict:
    """Evaluate the kept model on `eval.final_tasks`, log the table, export for sentence-transformers."""
    if not main:
        return {}
    from trainer.evaluate import format_table
    from trainer.export import export
    from trainer.model import SentenceEncoder

    model = SentenceEncoder.load(model_dir)
    scores = _evaluate(model, cfg, list(cfg.eval.final_tasks)) if cfg.eval.final_tasks and cfg.eval.enabled else {}
    if scores:
        tracker.log_metrics({f"sts/{k}": v for k, v in scores.items()}, step=0)
        tracker.log_text(format_table(scores) + "\n", "sts_results.md")
        with writing("the STS results", Path(cfg.output_dir) / "sts_results.json"):
            (Path(cfg.output_dir) / "sts_results.json").write_text(json.dumps(scores, indent=2))
    with writing("the export", Path(cfg.output_dir) / "export"):
        export_dir = export(model_dir, Path(cfg.output_dir) / "export")
    tracker.log_artifact(export_dir, "export")
    return scores


def _print_summary(result: TrainResult, output_dir: Path, tracker: Any) -> None:
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
    lines += tracker.summary_lines()
    print("\n".join(lines), flush=True)
