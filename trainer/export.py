"""`python -m trainer export --checkpoint DIR --output DIR [--push-to-hub REPO]`: a folder that
`sentence_transformers.SentenceTransformer` loads offline, with no "MISSING / newly initialized" report, and that
encodes exactly like our `SentenceEncoder.encode`.

It is built and saved through the sentence-transformers API: `SentenceTransformer(modules=[Transformer, Pooling,
Normalize], similarity_fn_name="cosine").save()` writes the backbone + tokenizer at the root, `1_Pooling/`,
`2_Normalize/`, `modules.json`, `sentence_bert_config.json` and `config_sentence_transformers.json`; the
model card (`README.md`, trainer/model_card.py) holds the training config and the STS table of the run.
Our backbones carry no pooler head (`SentenceEncoder` drops BERT's, unused): `sentence_bert_config.json`
records `model_kwargs: {add_pooling_layer: false}` so that sentence-transformers builds the backbone without it
too. `cls_mlp` exports as plain `cls`: SimCSE trains with the MLP head and evaluates without it.
`encoder_config.json` is kept too, so `SentenceEncoder.load` and `trainer evaluate` read the export directly.

The output folder is replaced only when it is empty, missing, or an earlier export (its three config files
say so); anything else (a run folder given by mistake) needs `overwrite=True` (`--overwrite`).
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from trainer.errors import UserError
from trainer.files import follow_umask


EXPORT_MARKERS = ("modules.json", "sentence_bert_config.json", "encoder_config.json")


def check_target(output_dir: str | Path, *, overwrite: bool = False, source: Optional[Path] = None) -> None:
    """Raise UserError unless `output_dir` may be replaced by an export (see the module doc)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"export target {output_dir} is a file, not a folder")
    if source is not None and output_dir.resolve() in source.resolve().parents:
        raise UserError(f"export target {output_dir} holds the checkpoint {source} being exported; choose another folder")
    if overwrite or not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not all((output_dir / name).is_file() for name in EXPORT_MARKERS):
        raise UserError(
            f"export target {output_dir} is not empty and is not an earlier export; it would be deleted. Choose "
            "another folder, or pass --overwrite to replace it"
        )


def export(checkpoint_dir: str | Path, output_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the sentence-transformers folder for a checkpoint / best / save() folder; returns its path.
    `output_dir` is replaced when allowed by `check_target`."""
    from trainer.model import SentenceEncoder

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if not checkpoint_dir.exists():
        raise UserError(f"checkpoint not found: {checkpoint_dir}")
    check_target(output_dir, overwrite=overwrite, source=checkpoint_dir)
    model = SentenceEncoder.load(checkpoint_dir)
    # Written under a temporary name and renamed: an interrupted export never looks complete.
    tmp = output_dir.with_name(f".{output_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_sentence_transformers(model, checkpoint_dir, tmp)
    follow_umask(tmp)  # safetensors writes model.safetensors 0600 whatever the umask
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return output_dir


def _write_sentence_transformers(model: Any, checkpoint_dir: Path, folder: Path) -> None:
    """Save `model` (a `SentenceEncoder`) into the empty `folder` through the sentence-transformers API."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from trainer.cli import version
    from trainer.model import ENCODER_CONFIG
    from trainer.model_card import model_card

    pooler = "mean" if model.pooler == "mean" else "cls"
    stage = folder / ".backbone"  # the HF folder sentence-transformers' Transformer module loads from
    model.backbone.save_pretrained(stage)
    model.tokenizer.save_pretrained(stage)
    model_kwargs = _model_kwargs(model.backbone)
    transformer = Transformer(str(stage), model_kwargs=model_kwargs, max_seq_length=model.max_length)
    st = SentenceTransformer(
        modules=[transformer, Pooling(model.hidden_size, pooling_mode=pooler), Normalize()],
        similarity_fn_name="cosine",
        device="cpu",
    )
    st.save(str(folder), create_model_card=False)
    shutil.rmtree(stage)
    if model_kwargs:
        st_config = folder / "sentence_bert_config.json"
        st_config.write_text(json.dumps({**json.loads(st_config.read_text()), "model_kwargs": model_kwargs}, indent=2))
    (folder / ENCODER_CONFIG).write_text(json.dumps({"pooler": pooler, "max_length": model.max_length}, indent=2))
    card = model_card(checkpoint_dir, pooler=pooler, max_length=model.max_length, dimension=model.hidden_size,
                      version=version())
    (folder / "README.md").write_text(card, encoding="utf-8")


def _model_kwargs(backbone: Any) -> dict:
    """`from_pretrained` arguments that rebuild `backbone` as saved: no pooler head where the class has one."""
    takes_flag = "add_pooling_layer" in inspect.signature(type(backbone).__init__).parameters
    return {"add_pooling_layer": False} if takes_flag and getattr(backbone, "pooler", None) is None else {}


def push_to_hub(folder: str | Path, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None) -> str:
    """Upload an export folder to the Hugging Face Hub model repo `repo_id` (created if missing); returns its URL.
    Credentials as huggingface_hub finds them (`hf auth login`, HF_TOKEN) unless `token` is given."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                      commit_message="Upload sentence-transformers model (contrastive-trainer export)")
    return str(url)
