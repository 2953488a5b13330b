import pytest
import torch

from tests.helpers import make_tiny_encoder_dir
from trainer.errors import UserError
from trainer.model import SentenceEncoder


@pytest.mark.parametrize("pooler", ["cls", "cls_mlp", "mean"])
def test_embeddings_normalised_and_save_load_roundtrip(tmp_path, pooler):
    model = SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler=pooler, max_length=16)
    sentences = ["the city of water", "a red house", "music"]
    emb = model.encode(sentences, batch_size=2)
    assert emb.shape == (3, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    saved = model.save(tmp_path / "saved")
    again = SentenceEncoder.load(saved)
    assert again.pooler == pooler and again.max_length == 16
    torch.testing.assert_close(again.encode(sentences), emb)


def test_cls_mlp_head_only_in_training(tmp_path):
    model = SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler="cls_mlp")
    model.backbone.config.hidden_dropout_prob = 0.0
    batch = model.tokenize(["the city of water"])
    model.eval()
    plain = model(**batch)
    cls_model = SentenceEncoder(model.backbone, model.tokenizer, pooler="cls")
    cls_model.eval()
    torch.testing.assert_close(plain, cls_model(**batch))
    model.train()
    for m in model.modules():  # no dropout, so the only difference in training mode is the MLP head
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    assert not torch.allclose(model(**batch), plain)


def test_mean_pooling_ignores_padding(tmp_path):
    model = SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler="mean").eval()
    alone = model.encode(["red"])
    padded = model.encode(["red", "the city of water and the river of the world"], batch_size=2)
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)


def test_checkpoint_folder_with_model_subfolder(tmp_path):
    model = SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler="mean")
    model.save(tmp_path / "ckpt" / "model")
    assert SentenceEncoder.load(tmp_path / "ckpt").pooler == "mean"


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SentenceEncoder.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        SentenceEncoder.load(tmp_path / "empty")


def test_reload_of_own_save_is_quiet_and_headless(tmp_path, capfd):
    # Our saves drop the backbone's unused pooler head; reloading them must not make transformers build and
    # randomly initialise that head again (it reports the weights "MISSING", which reads like a broken save).
    model = SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler="mean")
    saved = model.save(tmp_path / "saved")
    capfd.readouterr()
    again = SentenceEncoder.load(saved)
    out, err = capfd.readouterr()
    assert "MISSING" not in out + err
    assert getattr(again.backbone, "pooler", None) is None
