"""The pair step's distributed contract: 2 gloo processes with DDP give, in float64, the loss and parameter
gradients of ONE process on the concatenated batch, with hard negatives from both ranks (gathered with
gradient), duplicates masked across ranks (text keys gathered without gradient), empty negative slots and
a queue filled by the first step with keys (identical on both ranks). Pattern of tests/test_distributed.py."""

from __future__ import annotations

import traceback

import pytest
import torch

from tests.helpers import save_rank_result, spawn_and_collect
from tests.test_pairs_loss import TokenEncoder, pair_batch
from trainer.config import LossConfig
from trainer.losses import build_objective
from trainer.pair_step import pair_step_loss

WORLD, B, K = 2, 3, 2
CASES = {
    "infonce": dict(name="infonce", temperature=0.1, queue_size=8),
    "softcse_weight": dict(name="softcse", temperature=0.1, gamma=2.0, normalize_weights=True),
    "softcse_temperature": dict(name="softcse", softcse_mode="temperature", gamma=1.5, tau_min=0.05, tau_max=0.2),
}

# The global batch of each step; duplicates across the two ranks' rows (rank 1's positive "red city" is
# rank 0's anchor; rank 1's negative "blue river" is rank 0's positive) and empty slots ("").
STEPS = [
    (["red city", "good day", "the war", "music film", "blue water", "a team"],
     ["blue river", "nice day", "war time", "red city", "the river", "a team"],
     [["bad day", ""], ["light game", "green house"], ["red city", "time"],
      ["blue river", "film music"], ["new school", ""], ["two people", "one man"]]),
    (["state school", "her house", "the war", "blue water", "first year", "children light"],
     ["a school", "his house", "war time", "the water", "the year", "red light"],
     [["the war", "a team"], ["her city", ""], ["war", "time war"],
      ["good world", "bad world"], ["new year", "year"], ["blue light", "children"]]),
]


def _rank_rows(batch: dict, rank: int) -> dict:
    """Rank `rank`'s share of a global pair batch (its B pairs and their B*K negatives)."""
    out = {}
    for key, value in batch.items():
        per = B * K if key.startswith("negative_") else B
        out[key] = value[rank * per:(rank + 1) * per]
    return out


def _run(model, objective, batches, rank: int) -> list[dict]:
    steps = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out, candidates, keys = pair_step_loss(model, batch, objective, rank)
        out["loss"].backward()
        objective.enqueue(candidates, keys)
        module = getattr(model, "module", model)
        steps.append({"loss": out["loss"].item(), "masked": out["masked_duplicates"].item(),
                      "grads": {n: p.grad.detach().clone() for n, p in module.named_parameters()},
                      "queue": objective.queue.state_dict()})
    return steps


def _objective(case: str):
    return build_objective(LossConfig(kernel="chunked", **CASES[case]))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    result: dict = {}
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        batches = [_rank_rows(pair_batch(*step), rank) for step in STEPS]
        for case in CASES:
            result[case] = _run(DDP(TokenEncoder()), _objective(case), batches, rank)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        save_rank_result(result, out_dir, rank)
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs_dist")
    return spawn_and_collect(_worker, (str(tmp / "rendezvous"), str(tmp)), WORLD, tmp)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_with_hard_negatives_and_masking(spawned, case):
    want = _run(TokenEncoder(), _objective(case), [pair_batch(*step) for step in STEPS], 0)
    for step, ref in enumerate(want):
        assert sum(res[case][step]["loss"] for res in spawned) / WORLD == pytest.approx(ref["loss"], rel=1e-12)
        for r, res in enumerate(spawned):
            got = res[case][step]
            assert got["masked"] == ref["masked"] > 0  # the count covers the whole global batch
            for name, g in ref["grads"].items():
                torch.testing.assert_close(got["grads"][name], g, rtol=1e-10, atol=1e-13,
                                           msg=lambda m: f"{case} step {step} rank {r} {name}: {m}")
            assert any(g.abs().max() > 1e-6 for g in ref["grads"].values())
            if CASES[case].get("queue_size"):
                for key in ("buffer", "keys"):
                    assert torch.equal(got["queue"][key], spawned[0][case][step]["queue"][key])
                torch.testing.assert_close(got["queue"]["buffer"], ref["queue"]["buffer"], rtol=0, atol=1e-6)
                assert torch.equal(got["queue"]["keys"], ref["queue"]["keys"])
