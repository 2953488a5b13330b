"""Cached gradients, activation checkpointing and rank-distinct dropout (trainer/step.py, issue 13).

Proofs, in float64 with dropout 0 so both sides compute the same function:
- one process: a cached step (chunks of 1, 3 and more rows than the batch) leaves the parameter gradients,
  loss dict and candidates of the plain step, for InfoNCE, both SoftCSE modes and IFTCL scoring a queue;
- 2 gloo processes through the trainer's own Accelerator and `accelerate_backprop` (DDP, grad_accum 2): the
  cached and the plain step both give the single-process gradient on the concatenated batch, with ONE
  gradient all-reduce per optimizer step (a DDP comm hook counts them);
- dropout on: the re-encoded chunks equal the no-grad ones bit for bit (RNG replay), also with checkpointing;
- `model.gradient_checkpointing` really recomputes the layers and keeps the gradient;
- the ranks of a real `engine._setup` draw different dropout masks for identical inputs, from identical weights;
- the loop: cached training follows the plain losses, and a crashed cached run resumes exactly.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_encoder_dir, save_rank_result, spawn_and_collect, write_corpus
from tests.test_distributed import B_LOCAL, CASES, TokenEncoder, _data, _objective
from trainer.config import ConfigError, ModelConfig, load_config
from trainer.model import SentenceEncoder, build_encoder
from trainer.step import PLAIN, Backprop, forward_backward

SENTENCES = ["the city of water", "a red house on the river", "music", "two children and the team", "blue",
             "the first light of the day was green", "war", "a good game"]
ACCUM = 2


def _token_batch(data: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in data.items() if "input_ids" in k or "attention_mask" in k}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys(), label
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-13, msg=lambda m: f"{label} {name}: {m}")


def _run_steps(model, objective, batches: list[dict], mini: int, backprop: Backprop = PLAIN) -> list[dict]:
    """Each batch a step of its own (zero_grad, forward_backward, enqueue): the loss dict, grads, candidates."""
    steps = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out, candidates = forward_backward(model, batch, objective, 0, mini_batch_size=mini, backprop=backprop)
        objective.enqueue(candidates)
        steps.append({"out": out, "grads": _grads(model), "candidates": candidates})
    return steps


@pytest.mark.parametrize("mini", [1, 3, 100])
@pytest.mark.parametrize("case", list(CASES))
def test_cached_step_equals_plain_step_in_one_process(case, mini):
    batches = [_token_batch(_data(2, step), slice(0, 2 * B_LOCAL)) for step in range(2)]  # step 2 scores the queue
    plain = _run_steps(TokenEncoder(), _objective(case), batches, 0)
    cached = _run_steps(TokenEncoder(), _objective(case), batches, mini)
    for step, (p, c) in enumerate(zip(plain, cached)):
        _assert_same(c["grads"], p["grads"], f"{case} mini {mini} step {step}")
        _assert_same(c["out"], p["out"], f"{case} loss dict")
        assert not c["out"]["loss"].requires_grad
        torch.testing.assert_close(c["candidates"], p["candidates"], rtol=0, atol=1e-14)
    assert all(any(g.abs().max() > 1e-6 for g in p["grads"].values()) for p in plain), "trivial gradient"


def _tiny_bert(tmp_path: Path, dropout: float, *, checkpointing: bool = False) -> SentenceEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path=str(make_tiny_encoder_dir(tmp_path)), pooler="mean", max_length=16,
                      dropout=dropout, gradient_checkpointing=checkpointing)
    return build_encoder(cfg).train()


def _bert_batch(model: SentenceEncoder) -> dict:
    batch = model.tokenize(SENTENCES)
    fraternal = model.tokenize(SENTENCES[::-1])  # another length: fraternal views are padded on their own
    return {**batch, **{"fraternal_" + k: v for k, v in fraternal.items()}}


def test_cached_step_equals_plain_step_on_the_real_encoder(tmp_path):
    """The HF encoder (token_type_ids, a fraternal view of its own length), IFTCL with a queue, float64."""
    models = [_tiny_bert(tmp_path, 0.0).double() for _ in range(2)]
    objectives = [_objective("iftcl") for _ in range(2)]
    batches = [_bert_batch(models[0])] * 2
    plain = _run_steps(models[0], objectives[0], batches, 0)
    cached = _run_steps(models[1], objectives[1], batches, 5)
    for p, c in zip(plain, cached):
        _assert_same(c["grads"], p["grads"], "tiny BERT iftcl")
        _assert_same(c["out"], p["out"], "tiny BERT iftcl loss dict")


def _record_outputs(model) -> list[tuple[bool, torch.Tensor]]:
    seen: list[tuple[bool, torch.Tensor]] = []
    model.register_forward_hook(lambda module, args, out: seen.append((torch.is_grad_enabled(), out.detach().clone())))
    return seen


@pytest.mark.parametrize("checkpointing, bf16", [(False, False), (True, False), (False, True)],
                         ids=["plain", "checkpointing", "bf16-autocast"])
def test_reencoded_chunks_replay_the_dropout_masks_exactly(tmp_path, checkpointing, bf16):
    model = _tiny_bert(tmp_path, 0.1, checkpointing=checkpointing)
    if bf16:  # as Accelerate's mixed_precision=bf16 wraps the forward
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    seen = _record_outputs(model)
    forward_backward(model, _bert_batch(model), _objective("iftcl"), 0, mini_batch_size=5)
    no_grad = [out for grad, out in seen if not grad]
    with_grad = [out for grad, out in seen if grad]
    assert len(no_grad) == len(with_grad) == 4 + 2  # 16 rows of two views in chunks of 5, 8 fraternal rows
    for i, (first, again) in enumerate(zip(no_grad, with_grad)):
        assert torch.equal(first, again), f"chunk {i}: the re-encoded embeddings differ from the first pass"
    both_views = torch.cat(no_grad[:4])
    n = len(SENTENCES)
    assert not torch.allclose(both_views[:n], both_views[n:]), "dropout off? the two views are identical"


def _layer0_calls(model) -> list[int]:
    calls = [0]
    # on a submodule: the checkpointed layer's own hooks run outside the recomputed function
    model.backbone.encoder.layer[0].attention.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradient(tmp_path):
    batches = [{k: v for k, v in _bert_batch(_tiny_bert(tmp_path, 0.0)).items() if "fraternal" not in k}]
    results = {}
    for name, checkpointing, mini in (("plain", False, 0), ("ckpt", True, 0), ("ckpt+cached", True, 5)):
        model = _tiny_bert(tmp_path, 0.0, checkpointing=checkpointing).double()
        calls = _layer0_calls(model)
        results[name] = _run_steps(model, _objective("infonce"), batches, mini)[0]["grads"], calls[0]
    assert results["plain"][1] == 1
    assert results["ckpt"][1] == 2, "layer 0 ran once: gradient checkpointing is not on"
    assert results["ckpt+cached"][1] == 4 + 4 * 2  # 4 chunks: the first pass, then re-encoded + recomputed
    _assert_same(results["ckpt"][0], results["plain"][0], "checkpointing")
    _assert_same(results["ckpt+cached"][0], results["plain"][0], "checkpointing + cached")


def test_mini_batch_size_must_not_be_negative():
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_config(None, ["optim.mini_batch_size=-1"])
    assert load_config(None, []).optim.mini_batch_size == 0
    assert load_config(None, []).model.gradient_checkpointing is False


# ----------------------------------------------------------------------------------------------------------
# 2 gloo processes: the trainer's own set-up (engine._setup -> Accelerator, DDP) in each


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_config(tmp: Path, name: str, *extra: str):
    return load_config(None, [
        f"output_dir={tmp / name}", f"model.name_or_path={make_tiny_encoder_dir(tmp)}", "model.pooler=mean",
        "model.max_length=16", f"data.train={tmp / 'corpus.txt'}", "data.batch_size=4", "data.shuffle_buffer=0",
        "optim.lr=1e-3", "eval.sts_dir=", "tracking.enabled=false", "log_every=1", *extra,
    ])


def _dropout_draws(run) -> dict:
    """One forward of the same sentences in train mode, on this rank's model as `_setup` left it."""
    model = run.prep.unwrapped
    run.prep.model.train()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    with torch.no_grad():
        emb = run.prep.model(**model.tokenize(SENTENCES))
    return {"emb": emb, "weights": weights}


def _ddp_cases(acc, rank: int, world: int) -> dict:
    """Every loss case, plain and cached, under the Accelerator's DDP with `accelerate_backprop`, ACCUM
    micro-batches per optimizer step; counts the gradient all-reduces (DDP comm hook calls)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from trainer.step import accelerate_backprop

    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    results = {}
    for case in CASES:
        for mini in (0, 3):
            model, objective, reduces = acc.prepare(TokenEncoder()), _objective(case), []
            model.register_comm_hook(None, lambda state, bucket: reduces.append(1) or allreduce_hook(None, bucket))
            backprop, losses = accelerate_backprop(acc, model), []
            for micro in range(ACCUM):
                with acc.accumulate(model):
                    out, candidates = forward_backward(model, _token_batch(_data(world, micro), rows), objective,
                                                       rank, mini_batch_size=mini, backprop=backprop)
                objective.enqueue(candidates)
                losses.append(out["loss"].item())
            results[case, mini] = {"grads": _grads(model.module), "losses": losses, "reduces": len(reduces)}
    return results


def _worker(rank: int, world: int, port: int, tmp: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result: dict = {}
    try:
        from trainer import engine
        from trainer.outputs import OutputLock

        cfg = _train_config(Path(tmp), "setup", "model.dropout=0.1", f"optim.grad_accum={ACCUM}")
        run = engine._setup(cfg, resume=False, lock=OutputLock(Path(cfg.output_dir).resolve()))
        result["dropout"] = _dropout_draws(run)
        result["cases"] = _ddp_cases(run.accelerator, rank, world)
    except Exception:  # report in the parent, which shows the traceback
        result["error"] = traceback.format_exc()
    finally:
        save_rank_result(result, out_dir, rank)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    world, tmp = 2, tmp_path_factory.mktemp("step2")
    write_corpus(tmp / "corpus.txt", num_lines=40)
    make_tiny_encoder_dir(tmp)
    return world, spawn_and_collect(_worker, (world, _free_port(), str(tmp), str(tmp)), world, tmp)


def _reference(case: str, world: int) -> tuple[dict, list[float]]:
    """One process, plain step, the concatenated batch of every micro-batch, loss / ACCUM each."""
    model, objective, losses = TokenEncoder(), _objective(case), []
    backprop = Backprop(lambda loss, last: (loss / ACCUM).backward())
    for micro in range(ACCUM):
        out, candidates = forward_backward(model, _token_batch(_data(world, micro), slice(0, world * B_LOCAL)),
                                           objective, 0, backprop=backprop)
        objective.enqueue(candidates)
        losses.append(out["loss"].item())
    return _grads(model), losses


@pytest.mark.parametrize("mini", [0, 3], ids=["plain", "cached"])
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_cached_step_equals_single_process_with_one_allreduce_per_step(spawned, case, mini):
    world, results = spawned
    want_grads, want_losses = _reference(case, world)
    for r, res in enumerate(results):
        got = res["cases"][case, mini]
        _assert_same(got["grads"], want_grads, f"{case} mini {mini} rank {r}")
        # the tiny encoder's gradients fit one DDP bucket: one all-reduce per optimizer step, not one per chunk
        assert got["reduces"] == 1, f"{got['reduces']} gradient all-reduces in one optimizer step"
    for micro in range(ACCUM):
        mean = sum(res["cases"][case, mini]["losses"][micro] for res in results) / world
        assert mean == pytest.approx(want_losses[micro], rel=1e-12)


def test_ranks_draw_different_dropout_masks_from_identical_weights(spawned):
    _, results = spawned
    first, second = (res["dropout"] for res in results)
    assert torch.equal(first["weights"], second["weights"]), "model init must be identical on every rank"
    assert not torch.allclose(first["emb"], second["emb"]), "both ranks drew the same dropout masks"


# ----------------------------------------------------------------------------------------------------------
# The loop


class Crash(RuntimeError):
    pass


def test_cached_training_follows_plain_training_and_resumes_exactly(tmp_path):
    from trainer.engine import train

    write_corpus(tmp_path / "corpus.txt", num_lines=64)
    common = ("optim.max_steps=4", "checkpoint_every=2", "loss.name=iftcl", "loss.queue_size=8")
    plain = train(_train_config(tmp_path, "plain", "model.dropout=0.0", *common))
    cached = train(_train_config(tmp_path, "cached", "model.dropout=0.0", "optim.mini_batch_size=3", *common))
    for (step, a), (_, b) in zip(cached.losses, plain.losses):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), step  # float32: chunked sums differ in order

    # dropout on: the resumed run restores the RNG, and each cached step replays its own draws
    straight = train(_train_config(tmp_path, "straight", "optim.mini_batch_size=3", *common))

    def crash(step, loss):
        if step == 3:
            raise Crash()

    crashed = _train_config(tmp_path, "crashed", "optim.mini_batch_size=3", *common)
    with pytest.raises(Crash):
        train(crashed, on_step=crash)
    resumed = train(crashed, resume=True)
    assert [s for s, _ in resumed.losses] == [3, 4]
    expected = dict(straight.losses)
    for step, loss in resumed.losses:
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
