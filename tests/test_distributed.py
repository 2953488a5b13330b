"""The distributed-gradient contract, proven on CPU: W gloo processes with DDP and `gather_with_grad` give, in
float64, the parameter gradients of ONE process on the concatenated batch (lightly#1531's test, STYLE.md).

One spawn per world size (2 and 3) runs every case and writes its results; the test functions compare them
with a single-process reference computed here. Cases: InfoNCE, SoftCSE weight and temperature modes, IFTCL
(two steps: the second scores against the queue filled from the first; the queue must be identical on every
rank and equal to the single-process queue), and the trainer's own `trainer.step.step_loss` under DDP. Plus the helpers:
uneven batches raise on every rank, `all_reduce_mean`, `broadcast_object`, `gather_no_grad`.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import pytest
import torch

from tests.helpers import save_rank_result, spawn_and_collect
from trainer import distributed as dist
from trainer.config import LossConfig
from trainer.losses import build_objective

B_LOCAL = 4
FEATURES, DIM = 10, 8
VOCAB, SEQ = 30, 6

# name -> LossConfig kwargs. kernel="chunked": the CPU path of kernels.sim_softmax_lse, fp64 in fp64 out.
CASES = {
    "infonce": dict(name="infonce", temperature=0.1),
    "softcse_weight": dict(name="softcse", softcse_mode="weight", gamma=2.0, normalize_weights=True),
    "softcse_temperature": dict(name="softcse", softcse_mode="temperature", gamma=1.5, tau_min=0.05, tau_max=0.2),
    # Margins chosen so the Twins hinge is active on random data (otherwise its gradient is 0).
    "iftcl": dict(name="iftcl", temperature=0.1, margin_low=0.3, margin_high=0.4, twins_weight=0.5, queue_size=9),
}
ENGINE_CASES = ("infonce", "iftcl")


def _objective(case: str):
    return build_objective(LossConfig(kernel="chunked", **CASES[case]))


def _data(world: int, step: int) -> dict[str, torch.Tensor]:
    """The GLOBAL batch of a step (same on every process): two views and a fraternal view per sentence."""
    g = torch.Generator().manual_seed(1000 + step)
    n = world * B_LOCAL
    feats = {k: torch.randn(n, FEATURES, generator=g, dtype=torch.float64) for k in ("x1", "x2", "x3")}
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = (torch.arange(SEQ)[None, :] < torch.randint(2, SEQ + 1, (n, 1), generator=g)).long()
    fids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    return {**feats, "input_ids": ids * mask, "attention_mask": mask, "fraternal_input_ids": fids,
            "fraternal_attention_mask": torch.ones_like(fids)}


class Encoder(torch.nn.Module):
    """Linear-tanh-linear on features, L2-normalised: a stand-in for the sentence encoder, in float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, DIM))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.net(x), dim=-1)


class TokenEncoder(torch.nn.Module):
    """Masked mean of token embeddings + projection: has the SentenceEncoder call signature, in float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 12)
        self.proj = torch.nn.Linear(12, DIM)
        self.double()

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).to(torch.float64)
        pooled = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(self.proj(torch.tanh(pooled)), dim=-1)


def _feature_step(model, objective, data: dict, rows: slice, positive_index) -> tuple[dict, torch.Tensor]:
    """One loss on the given rows: anchors+positives in ONE forward (as the engine), fraternal in a second.
    Returns the loss dict and the gathered candidates (detached) to enqueue after backward."""
    num = rows.stop - rows.start
    emb = model(torch.cat([data["x1"][rows], data["x2"][rows]]))
    anchors, positives = emb[:num], emb[num:]
    candidates = dist.gather_with_grad(positives)
    fraternal = dist.gather_with_grad(model(data["x3"][rows])) if objective.needs_fraternal else None
    out = objective(anchors, candidates, positive_index=positive_index, fraternal=fraternal)
    return out, candidates.detach()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------------
# The spawned workers


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result: dict = {}
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from trainer.step import step_loss

        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for case in CASES:
            model, objective = DDP(Encoder()), _objective(case)
            steps = []
            for step in range(2 if objective.queue.enabled else 1):
                model.zero_grad(set_to_none=True)
                out, candidates = _feature_step(model, objective, _data(world, step), rows,
                                                dist.local_positive_index(B_LOCAL))
                out["loss"].backward()
                objective.enqueue(candidates)
                steps.append({"loss": out["loss"].item(), "grads": _grads(model.module),
                              "queue": objective.queue.state_dict()})
            result[case] = steps

        for case in ENGINE_CASES:
            model, objective = DDP(TokenEncoder()), _objective(case)
            data = _data(world, 0)
            batch = {k: v[rows] for k, v in data.items() if "input_ids" in k or "attention_mask" in k}
            out, _ = step_loss(model, batch, objective, rank)
            out["loss"].backward()
            result["engine_" + case] = {"loss": out["loss"].item(), "grads": _grads(model.module)}

        # Helpers: uneven batches raise the same error on every rank instead of hanging.
        try:
            dist.gather_with_grad(torch.zeros(B_LOCAL + rank, DIM, requires_grad=True))
            result["uneven"] = None
        except dist.UnevenBatchError as exc:
            result["uneven"] = str(exc)
        result["mean"] = dist.all_reduce_mean(torch.tensor([float(rank), 1.0])).tolist()
        result["broadcast"] = dist.broadcast_object({"from": rank} if rank == 0 else None)
        result["gathered"] = dist.gather_no_grad(torch.full((2, 3), float(rank))).tolist()
        result["rank"], result["world"] = dist.rank(), dist.world_size()
    except Exception:  # report in the parent, which shows the traceback
        result["error"] = traceback.format_exc()
    finally:
        save_rank_result(result, out_dir, rank)
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2proc", "3proc"])
def spawned(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"dist{world}")
    return world, spawn_and_collect(_worker, (world, str(tmp / "rendezvous"), str(tmp)), world, tmp)


# ----------------------------------------------------------------------------------------------------------
# Single-process references on the concatenated (global) batch


def _reference(case: str, world: int) -> list[dict]:
    model, objective = Encoder(), _objective(case)
    n = world * B_LOCAL
    steps = []
    for step in range(2 if objective.queue.enabled else 1):
        model.zero_grad(set_to_none=True)
        out, candidates = _feature_step(model, objective, _data(world, step), slice(0, n), None)
        out["loss"].backward()
        objective.enqueue(candidates)
        steps.append({"loss": out["loss"].item(), "grads": _grads(model), "queue": objective.queue.state_dict()})
    return steps


def _assert_grads_equal(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        # float64 end to end: only the summation order differs (gather / reduce-scatter / DDP average).
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-13, msg=lambda m: f"{label} {name}: {m}")
    assert any(g.abs().max() > 1e-6 for g in want.values()), f"{label}: trivial (zero) gradient"


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_gradients_equal_single_process(spawned, case):
    world, results = spawned
    want = _reference(case, world)
    for step, ref in enumerate(want):
        mean_loss = sum(res[case][step]["loss"] for res in results) / world
        assert mean_loss == pytest.approx(ref["loss"], rel=1e-12)
        for r, res in enumerate(results):  # DDP leaves the same averaged gradient on every rank
            _assert_grads_equal(res[case][step]["grads"], ref["grads"], f"{case} step {step} rank {r}")


def test_iftcl_queue_is_identical_on_every_rank_and_equals_single_process(spawned):
    world, results = spawned
    want = _reference("iftcl", world)
    for step, ref in enumerate(want):
        for r, res in enumerate(results):
            got = res["iftcl"][step]["queue"]
            assert (got["ptr"], got["count"]) == (ref["queue"]["ptr"], ref["queue"]["count"])
            torch.testing.assert_close(got["buffer"], ref["queue"]["buffer"], rtol=0, atol=1e-6)
        first = results[0]["iftcl"][step]["queue"]["buffer"]
        assert all(torch.equal(res["iftcl"][step]["queue"]["buffer"], first) for res in results)
    # The queue held entries when the second step ran: that step really scored against it.
    assert want[0]["queue"]["count"] == min(9, world * B_LOCAL) and want[1]["queue"]["count"] == 9


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_engine_step_loss_under_ddp_equals_single_process(spawned, case):
    """The trainer's `step_loss` (views in one forward, positive offset, fraternal gather) under DDP."""
    from trainer.step import step_loss

    world, results = spawned
    model, objective = TokenEncoder(), _objective(case)
    data = _data(world, 0)
    batch = {k: v for k, v in data.items() if "input_ids" in k or "attention_mask" in k}
    out, _ = step_loss(model, batch, objective, 0)
    out["loss"].backward()
    want = _grads(model)
    assert sum(res["engine_" + case]["loss"] for res in results) / world == pytest.approx(out["loss"].item(), rel=1e-12)
    for r, res in enumerate(results):
        _assert_grads_equal(res["engine_" + case]["grads"], want, f"engine {case} rank {r}")


def test_helpers_across_ranks(spawned):
    world, results = spawned
    for r, res in enumerate(results):
        assert (res["rank"], res["world"]) == (r, world)
        assert res["uneven"] is not None and "same shape" in res["uneven"], "uneven batches must raise on every rank"
        assert f"rank {world - 1}: ({B_LOCAL + world - 1}, {DIM})" in res["uneven"]
        assert res["mean"] == pytest.approx([(world - 1) / 2, 1.0])
        assert res["broadcast"] == {"from": 0}
        assert [row[0] for row in res["gathered"]] == [float(q) for q in range(world) for _ in range(2)]


def test_single_process_helpers_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert dist.gather_with_grad(x) is x
    assert dist.world_size() == 1 and dist.is_main()
    assert torch.equal(dist.local_positive_index(3), torch.arange(3))
    assert torch.equal(dist.all_reduce_mean(torch.tensor([2.0])), torch.tensor([2.0]))
    assert dist.broadcast_object({"a": 1}) == {"a": 1}


def _aborting_worker(rank: int, out_dir: str, save_first: bool) -> None:
    if save_first or rank == 0:
        save_rank_result({"rank": rank}, out_dir, rank)
    if rank == 1:
        # spawn SIGTERMs the other ranks when one dies: let rank 0 save first, as the real ranks had
        deadline = time.monotonic() + 60
        while not (Path(out_dir) / "rank0.pt").is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.abort()  # SIGABRT, as gloo's teardown once did


def test_spawn_tolerates_an_abort_only_after_every_rank_saved(tmp_path):
    """`spawn_and_collect` (the spawned fixtures' runner) accepts a rank's SIGABRT once every result is saved, and
    still fails when a rank died before saving."""
    done = tmp_path / "done"
    done.mkdir()
    assert [r["rank"] for r in spawn_and_collect(_aborting_worker, (str(done), True), 2, done)] == [0, 1]
    early = tmp_path / "early"
    early.mkdir()
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGABRT"):
        spawn_and_collect(_aborting_worker, (str(early), False), 2, early)
