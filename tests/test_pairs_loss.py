"""Pair losses in float64 against formulas written out here: the fused op's `exclude` keys (every backend and
both input gradients), and the pair step (hard negatives from every row, duplicate masking, empty negative
slots, the queue's keys) for InfoNCE and both SoftCSE modes, plus the masked-duplicate count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.chunked import chunked_sim_softmax_lse, mean_negative_weight
from trainer.config import LossConfig
from trainer.data.pairs import PAD_HASH, text_hash
from trainer.losses import build_objective
from trainer.pair_step import count_masked, pair_step_loss

N, M, D = 9, 23, 16


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _keys(seed=3):
    """Row keys (N, 2) and column keys (M,) from a small alphabet, so rows hit several columns, including
    their own positive column (which must stay)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 6, (N, 2), generator=g), torch.randint(1, 9, (M,), generator=g)


def masked_dense_lse(a, c, pos, row_keys, col_keys, *, temperature=0.05, weight_gamma=0.0):
    """lse with w_ij = 0 where col_keys[j] is a row key of i and j != p(i): products, not a log-sum-exp."""
    s = a @ c.T
    w = ((1.0 - s.detach().clamp(-1, 1)) / 2.0) ** weight_gamma
    is_pos = torch.zeros_like(s, dtype=torch.bool)
    is_pos[torch.arange(len(pos)), pos] = True
    hit = (row_keys[:, :, None] == col_keys[None, None, :]).any(1) & ~is_pos
    w = torch.where(is_pos, torch.ones_like(w), torch.where(hit, torch.zeros_like(w), w))
    return torch.log((w * torch.exp(s / temperature)).sum(1))


@pytest.mark.parametrize("backend", ["chunked", "reference", "auto", "triton"])
@pytest.mark.parametrize("weight_gamma", [0.0, 1.5])
def test_exclude_keys_match_the_masked_formula_with_gradients(backend, weight_gamma):
    if backend == "triton" and not kernels.triton_available():
        pytest.skip("triton not installed")
    a, c = unit(N, D, seed=1).requires_grad_(), unit(M, D, seed=2).requires_grad_()
    pos = torch.arange(N) * 2
    row_keys, col_keys = _keys()
    row_keys[0, 0] = col_keys[pos[0]]  # a row whose key matches its own positive column: that one stays
    grad = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = masked_dense_lse(a, c, pos, row_keys, col_keys, weight_gamma=weight_gamma)
    want_da, want_dc = torch.autograd.grad(want, (a, c), grad)
    # backend "triton" with keys runs the chunked path (the Triton kernels take no keys), on any device
    got = kernels.sim_softmax_lse(a, c, positive_index=pos, weight_gamma=weight_gamma, backend=backend,
                                  exclude=(row_keys, col_keys))
    got_da, got_dc = torch.autograd.grad(got, (a, c), grad)
    for x, y in ((got, want), (got_da, want_da), (got_dc, want_dc)):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-12)
    plain = kernels.sim_softmax_lse(a, c, positive_index=pos, weight_gamma=weight_gamma, backend="chunked")
    assert (got < plain - 1e-6).any(), "the keys must take terms out of some rows"


def test_exclude_keys_in_small_chunks_and_one_dimensional_row_keys():
    a, c = unit(N, D, seed=5), unit(M, D, seed=6)
    pos = torch.arange(N)
    row_keys, col_keys = _keys(seed=7)
    want = masked_dense_lse(a, c, pos, row_keys[:, :1], col_keys)
    got = chunked_sim_softmax_lse(a, c, positive_index=pos, block_size=4, exclude=(row_keys[:, 0], col_keys))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mean_negative_weight_leaves_excluded_columns_out():
    a, c = unit(N, D, seed=8), unit(M, D, seed=9)
    pos = torch.arange(N)
    row_keys, col_keys = _keys(seed=10)
    got = mean_negative_weight(a, c, weight_gamma=2.0, positive_index=pos, block_size=5,
                               exclude=(row_keys, col_keys))
    for i in range(N):
        negs = [j for j in range(M) if j != i and col_keys[j].item() not in row_keys[i].tolist()]
        want = sum(((1 - float(a[i] @ c[j])) / 2) ** 2 for j in negs) / len(negs)
        assert got[i].item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("bad, match", [
    ((torch.zeros(N, 2, dtype=torch.long),), "pair"),
    ((torch.zeros(N, 2), torch.zeros(M)), "integer"),
    ((torch.zeros(N + 1, 2, dtype=torch.long), torch.zeros(M, dtype=torch.long)), "shapes"),
    ((torch.zeros(N, 2, dtype=torch.long), torch.zeros(M - 1, dtype=torch.long)), "shapes"),
])
def test_exclude_argument_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        kernels.sim_softmax_lse(unit(N, D), unit(M, D), exclude=bad, backend="chunked")


# ----------------------------------------------------------------------------------------------------------
# The pair step against the written-out loss

VOCAB = 50


class TokenEncoder(torch.nn.Module):
    """Masked mean of token embeddings + projection, float64, no dropout (the SentenceEncoder signature)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 12)
        self.proj = torch.nn.Linear(12, D)
        self.double()

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        m = attention_mask.unsqueeze(-1).to(torch.float64)
        pooled = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(self.proj(torch.tanh(pooled)), dim=-1)


def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """Word ids (a stable toy tokenizer) right-padded, as the stream's arrays."""
    rows = [[2] + [1 + sum(map(ord, w)) % (VOCAB - 3) + 2 for w in t.split()] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def pair_batch(anchors, positives, negatives):
    """A pair batch as PairStream makes it; `negatives` is a list of K-lists ("" = an empty slot)."""
    flat = [n for row in negatives for n in row]
    batch = {**tokenize(anchors), **{f"positive_{k}": v for k, v in tokenize(positives).items()}}
    batch["anchor_hash"] = torch.tensor([text_hash(t) for t in anchors])
    batch["positive_hash"] = torch.tensor([text_hash(t) for t in positives])
    if flat:
        batch.update({f"negative_{k}": v for k, v in tokenize(flat).items()})
        batch["negative_hash"] = torch.tensor([text_hash(t) if t else PAD_HASH for t in flat])
    return batch


# Duplicates on purpose: row 3 repeats row 0's anchor and positive; row 2's positive is row 1's anchor; row 1's
# first negative is row 0's positive; row 4's negative repeats its own anchor; row 2 has an empty slot.
ANCHORS = ["red city", "blue river", "green house", "red city", "good day"]
POSITIVES = ["red town", "green water", "blue river", "red town", "nice day"]
NEGATIVES = [["bad war", "music film"], ["red town", "light game"], ["house war", ""],
             ["river time", "red day"], ["good day", "bad day"]]


def written_out_loss(model, *, temperature, mask, weight_gamma=0.0, tau_min=None, tau_max=None, tau_gamma=1.0,
                     normalize=False, queue=None, queue_texts=None):
    """Mean over rows of -s_ip/tau + log(exp(s_ip/tau) + sum_{j in neg(i)} w_ij exp(s_ij/tau_ij)): columns are
    every positive then every hard negative (then the queue); neg(i) leaves out the positive, empty slots and,
    with `mask`, every column whose TEXT is row i's anchor or positive. Pure Python over the embeddings."""
    with torch.no_grad():
        a = model(**tokenize(ANCHORS)).tolist()
        flat = [n for row in NEGATIVES for n in row]
        cols = model(**tokenize(POSITIVES)).tolist() + model(**tokenize(flat)).tolist()
        texts = POSITIVES + flat
    if queue is not None:
        cols += queue.tolist()
        texts += queue_texts
    total, masked = 0.0, 0
    for i, ai in enumerate(a):
        s = [sum(x * y for x, y in zip(ai, c)) for c in cols]
        negs = [j for j in range(len(cols)) if j != i and texts[j] != ""]
        if mask:
            dup = [j for j in negs if texts[j] in (ANCHORS[i], POSITIVES[i])]
            masked += len(dup)
            negs = [j for j in negs if j not in dup]
        clamp = [min(1.0, max(-1.0, v)) for v in s]
        w = {j: ((1 - clamp[j]) / 2) ** weight_gamma for j in negs}
        if normalize:
            mean_w = sum(w.values()) / len(w)
            w = {j: v / mean_w for j, v in w.items()}
        terms = [math.exp(s[i] / temperature)]
        for j in negs:
            t = temperature if tau_min is None else tau_min + (tau_max - tau_min) * ((1 + clamp[j]) / 2) ** tau_gamma
            terms.append(w[j] * math.exp(s[j] / t))
        total += math.log(sum(terms)) - s[i] / temperature
    return total / len(a), masked


CASES = {
    "infonce": (dict(name="infonce", temperature=0.1), {}),
    "softcse_weight": (dict(name="softcse", temperature=0.1, gamma=1.5, normalize_weights=True),
                       dict(weight_gamma=1.5, normalize=True)),
    "softcse_temperature": (dict(name="softcse", temperature=0.1, softcse_mode="temperature", gamma=2.0,
                                 tau_min=0.05, tau_max=0.2), dict(tau_min=0.05, tau_max=0.2, tau_gamma=2.0)),
}


@pytest.mark.parametrize("mask", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("case", list(CASES))
def test_pair_step_loss_matches_the_written_out_formula(case, mask):
    loss_kwargs, formula_kwargs = CASES[case]
    objective = build_objective(LossConfig(kernel="chunked", mask_duplicates=mask, **loss_kwargs))
    model = TokenEncoder()
    out, candidates, keys = pair_step_loss(model, pair_batch(ANCHORS, POSITIVES, NEGATIVES), objective, 0)
    want, masked = written_out_loss(model, temperature=loss_kwargs["temperature"], mask=mask, **formula_kwargs)
    assert out["loss"].item() == pytest.approx(want, rel=1e-12)
    assert candidates.shape == (len(POSITIVES) * 3, D) and keys.shape == (len(POSITIVES) * 3,)
    if mask:
        # row 0: red town (row 3's positive, row 1's negative); row 1: blue river (row 2's positive);
        # row 3: red town twice; row 4: its own anchor as a negative
        assert masked == 6 and out["masked_duplicates"].item() == masked
    else:
        assert "masked_duplicates" not in out
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())


def test_queue_entries_are_masked_by_their_keys():
    objective = build_objective(LossConfig(name="infonce", temperature=0.1, kernel="chunked", queue_size=4))
    model = TokenEncoder()
    queue_texts = ["nice day", "music film", "red city", "war"]
    with torch.no_grad():
        queued = model(**tokenize(queue_texts))
    objective.enqueue(queued, torch.tensor([text_hash(t) for t in queue_texts]))
    out, _, _ = pair_step_loss(model, pair_batch(ANCHORS, POSITIVES, NEGATIVES), objective, 0)
    # the queue stores float32
    want, masked = written_out_loss(model, temperature=0.1, mask=True, queue=queued.float().double(),
                                    queue_texts=queue_texts)
    assert out["loss"].item() == pytest.approx(want, rel=1e-12)
    assert out["masked_duplicates"].item() == masked == 6 + 3  # nice day (row 4), red city (rows 0 and 3)


def test_count_masked_counts_each_row_once_per_duplicate_column():
    cols = torch.tensor([5, 6, 7, 5, 8, 9, 7])  # row 0: anchor 9, positive 5 (cols 0 and 3); row 1: a = p = 7
    assert count_masked(torch.tensor([9, 7]), torch.tensor([5, 7]), cols).item() == (1 + 1) + 1


def test_queue_keys_follow_the_entries_and_survive_state_dict():
    from trainer.losses import HippocampusQueue
    from trainer.losses.queue import UNKNOWN_KEY

    q = HippocampusQueue(3)
    q.enqueue(unit(2, D), torch.tensor([1, 2]))
    q.enqueue(unit(2, D, seed=1))  # no keys: unknown
    assert q.keys().tolist() == [2, UNKNOWN_KEY, UNKNOWN_KEY]
    restored = HippocampusQueue(3)
    restored.load_state_dict(q.state_dict())
    assert restored.keys().tolist() == q.keys().tolist()
    old = {k: v for k, v in q.state_dict().items() if k != "keys"}  # a checkpoint from before keys
    restored.load_state_dict(old)
    assert restored.keys().tolist() == [UNKNOWN_KEY] * 3
