"""The export's model card (`README.md`): Hub metadata, how to load it, the run's training config and STS table.

The run's files are found beside the exported checkpoint: `config.yaml` (the resolved run config) and
`sts_results.json` (the final STS table) in the checkpoint folder or a parent up to the run folder
(`<run>/best`, `<run>/checkpoints/step_N`). A folder without them still gets a card, without those sections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

RUN_CONFIG = "config.yaml"
STS_RESULTS = "sts_results.json"

_FRONT_MATTER = """---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags:
- sentence-transformers
- sentence-similarity
- feature-extraction
- contrastive-trainer
---
"""


def find_run_file(checkpoint_dir: Path, name: str, levels: int = 3) -> Optional[Path]:
    """`name` in `checkpoint_dir` or one of its `levels` parents (the run folder), or None."""
    for folder in [checkpoint_dir, *list(checkpoint_dir.resolve().parents)[:levels]]:
        if (folder / name).is_file():
            return folder / name
    return None


def model_card(checkpoint_dir: Path, *, pooler: str, max_length: int, dimension: int, version: str) -> str:
    """The README.md text for the export of `checkpoint_dir`."""
    from trainer.evaluate import format_table

    lines = [
        _FRONT_MATTER,
        "# Sentence embedding model",
        "",
        f"Trained with contrastive-trainer {version}: {pooler} pooling, L2-normalised, {dimension} dimensions, "
        f"inputs truncated at {max_length} tokens, cosine similarity.",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("PATH_OR_REPO")',
        'embeddings = model.encode(["A sentence.", "Another one."])',
        "print(model.similarity(embeddings, embeddings))",
        "```",
    ]
    scores = find_run_file(checkpoint_dir, STS_RESULTS)
    if scores is not None:
        lines += ["", "## STS (Spearman x100, cosine)", "", format_table(json.loads(scores.read_text()))]
    config = find_run_file(checkpoint_dir, RUN_CONFIG)
    if config is not None:
        lines += ["", "## Training config", "", "```yaml", config.read_text(encoding="utf-8").rstrip(), "```"]
    return "\n".join(lines) + "\n"
