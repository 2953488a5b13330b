"""`python -m trainer export --checkpoint DIR --output DIR`: a folder `sentence_transformers.SentenceTransformer`
loads offline and that encodes exactly like our `SentenceEncoder.encode`.

Layout (sentence-transformers' own): the HF backbone + tokenizer at the root (module 0, Transformer),
`1_Pooling/` (cls or mean), `2_Normalize/`, `modules.json`, `sentence_bert_config.json` (max_seq_length).
`cls_mlp` exports as plain `cls`: SimCSE trains with the MLP head and evaluates without it.
`encoder_config.json` is kept too, so `SentenceEncoder.load` and `trainer evaluate` read the export directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from trainer.errors import UserError
from trainer.files import follow_umask


def export(checkpoint_dir: str | Path, output_dir: str | Path) -> Path:
    """Write the sentence-transformers folder for a checkpoint / best / save() folder; returns its path."""
    from trainer.model import ENCODER_CONFIG, SentenceEncoder

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if not checkpoint_dir.exists():
        raise UserError(f"checkpoint not found: {checkpoint_dir}")
    model = SentenceEncoder.load(checkpoint_dir)
    pooler = "mean" if model.pooler == "mean" else "cls"
    # Written under a temporary name and renamed: an interrupted export never looks complete.
    tmp = output_dir.with_name(f".{output_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.backbone.save_pretrained(tmp)
    model.tokenizer.save_pretrained(tmp)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2))
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": model.max_length, "do_lower_case": False}))
    (tmp / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": model.hidden_size,
        "pooling_mode_cls_token": pooler == "cls",
        "pooling_mode_mean_tokens": pooler == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (tmp / "2_Normalize").mkdir()
    (tmp / ENCODER_CONFIG).write_text(json.dumps({"pooler": pooler, "max_length": model.max_length}, indent=2))
    follow_umask(tmp)  # safetensors writes model.safetensors 0600 whatever the umask
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return output_dir
