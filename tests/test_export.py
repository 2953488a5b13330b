import pytest
import torch

from tests.helpers import make_tiny_encoder_dir
from trainer.errors import UserError
from trainer.export import export
from trainer.model import SentenceEncoder

SENTENCES = ["the city of water", "a red house on the river", "music", "two children and the team"]


@pytest.mark.parametrize("pooler", ["cls", "mean", "cls_mlp"])
def test_export_loads_in_sentence_transformers_and_encodes_identically(tmp_path, pooler):
    from sentence_transformers import SentenceTransformer

    model = SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler=pooler, max_length=16)
    model.save(tmp_path / "ckpt" / "model")
    out = export(tmp_path / "ckpt", tmp_path / "export")
    ours = model.encode(SENTENCES)
    st = SentenceTransformer(str(out), device="cpu")
    theirs = torch.as_tensor(st.encode(SENTENCES, convert_to_numpy=True))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # our own loader reads the export too (evaluate works on export folders)
    torch.testing.assert_close(SentenceEncoder.load(out).encode(SENTENCES), ours, atol=1e-6, rtol=1e-6)


def test_export_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not found"):
        export(tmp_path / "nope", tmp_path / "out")


def test_cli_export(tmp_path, capsys):
    from trainer.cli import main

    SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler="mean").save(tmp_path / "ckpt" / "model")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "export")]) == 0
    assert capsys.readouterr().out.startswith(f"exported to {tmp_path / 'export'}; load it with sentence_transformers")
    assert (tmp_path / "export" / "modules.json").is_file()
