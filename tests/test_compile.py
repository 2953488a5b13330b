"""`model.compile`: the compiled backbone trains to the eager numbers, keeps its state-dict keys, evaluates
eagerly, and a compiled run checkpoints, resumes and exports like an eager one.

Slow: inductor compiles the tiny BERT's forward and backward (~30-60 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_encoder_dir, write_corpus
from trainer.config import ModelConfig, load_config
from trainer.errors import UserError
from trainer.model import SentenceEncoder, build_encoder, compile_backbone

pytestmark = pytest.mark.slow
SENTENCES = ["the city of water", "a red house on the river", "music", "two children and the team",
             "the first light of the day was green", "war"]


def _encoder(tmp_path: Path) -> SentenceEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path=str(make_tiny_encoder_dir(tmp_path)), pooler="mean", max_length=16, dropout=0.0)
    return build_encoder(cfg).train()


def _embed_and_grads(model: SentenceEncoder) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    batch = model.tokenize(SENTENCES)
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_backbone_trains_to_the_eager_numbers_and_evaluates_eagerly(tmp_path):
    import torch._dynamo

    eager, compiled = _encoder(tmp_path), _encoder(tmp_path)
    keys = list(compiled.state_dict())
    compile_backbone(compiled)
    assert list(compiled.state_dict()) == keys  # no `_orig_mod.` prefix: checkpoints and exports unchanged
    torch._dynamo.reset()
    want_out, want_grads = _embed_and_grads(eager)
    got_out, got_grads = _embed_and_grads(compiled)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 1, "the training forward did not go through the compiler"
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # evaluation: eager (no recompile for eval mode or for each batch length), same embeddings
    emb = compiled.encode(SENTENCES + ["a much longer sentence than any other sentence of this list"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    torch.testing.assert_close(emb, eager.encode(SENTENCES + ["a much longer sentence than any other sentence "
                                                              "of this list"]), rtol=1e-5, atol=1e-6)


def test_compiled_run_trains_resumes_and_exports(tmp_path):
    from trainer.engine import train

    write_corpus(tmp_path / "corpus.txt", num_lines=64)
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.name_or_path={make_tiny_encoder_dir(tmp_path)}",
                 "model.pooler=mean", "model.max_length=16", "model.compile=true",
                 f"data.train={tmp_path / 'corpus.txt'}", "data.batch_size=4", "data.shuffle_buffer=0",
                 "optim.lr=1e-3", "eval.sts_dir=", "tracking.enabled=false", "log_every=1", "checkpoint_every=2"]
    first = train(load_config(None, overrides + ["optim.max_steps=2"]), progress=False)
    result = train(load_config(None, overrides + ["optim.max_steps=3"]), resume=True, progress=False)
    assert result.step == 3 and first.step == 2
    exported = SentenceEncoder.load(tmp_path / "run" / "export")
    assert exported.encode(SENTENCES).shape == (len(SENTENCES), 64)


def test_compile_is_refused_under_deepspeed(tmp_path, monkeypatch):
    from trainer.engine import train

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "model.compile=true", "eval.sts_dir=",
                             "tracking.enabled=false", f"data.train={tmp_path}"])
    with pytest.raises(UserError, match="model.compile is not supported under DeepSpeed"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
