"""Real launches on CPU: `accelerate launch` with 2 processes (DDP), DeepSpeed ZeRO-2 and ZeRO-3 through
Accelerate (`cpu_2proc_zero3.yaml`; ZeRO-1/2/3 also with cached gradients, `optim.mini_batch_size`), and a
two-"machine" launch on loopback. Each run's per-step losses equal a single-process (plain-step) run on the
same GLOBAL batches, and a run killed after a checkpoint continues, with `--resume`, on the uninterrupted losses.

How the global batches line up: `trainer.data.TrainStream` gives rank r of R the contiguous sample range
[r*K*B, (r+1)*K*B) of each epoch (K = N // (R*B) batches per rank), one shard here, no shuffle buffer. So
rank r's step s holds lines r*K*B + s*B ... + B. The single process (batch 2B) reads a copy of the corpus
reordered so that its step s holds exactly rank 0's then rank 1's lines of step s: the same global batch, in
rank order. Dropout is off so both sides compute the same function (each rank seeds its dropout with
seed + rank, which no single process can reproduce; tests/test_step.py checks that the ranks' masks differ);
losses then agree to float32 noise over all steps (the trajectories stay together: the gradients are the same).

Kill and resume: the launched run hard-exits (`os._exit`, no cleanup) right after step 3, with checkpoints
every 2 steps, and rank 1 writes its share of each checkpoint late (a checkpoint sealed too early shows);
`accelerate launch ... -m trainer train ... --resume` continues from step 2 and must reproduce steps 3-5 of
the uninterrupted single-process run (metrics.jsonl then holds steps 1-5 once each). Without the model,
optimizer, scheduler, data position or queue restored these losses differ by far more than the tolerance.
Every file of the checkpoint (DeepSpeed's ZeRO files included) passes the restricted-unpickler check first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_encoder_dir, write_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch_configs" / "accelerate"
B_LOCAL, WORLD, STEPS, CRASH_AT = 8, 2, 5, 3
# float32 training on both sides; the gradient all-reduce sums in another order than one process does.
RTOL = 2e-5

CRASH_SCRIPT = """
import os, sys, time
import accelerate.accelerator
from trainer import distributed
from trainer.config import load_config
from trainer.engine import train

_save_rank_state = accelerate.accelerator.save_accelerator_state

def slow_on_rank_1(*args, **kwargs):
    # Rank 1 writes its part of each checkpoint late: rank 0 must wait for it before sealing the folder.
    if os.environ.get("RANK") == "1":
        time.sleep(1.5)
    return _save_rank_state(*args, **kwargs)

accelerate.accelerator.save_accelerator_state = slow_on_rank_1

def crash(step, loss):
    if step == {crash_at}:
        # Rank 0 has appended this step's metrics before on_step runs; the barrier keeps another rank from
        # exiting first, which makes the launcher kill rank 0 before that line is written (seen in CI).
        distributed.barrier()
        os._exit(17)  # a hard kill on every rank: no finally blocks, no final checkpoint

train(load_config(None, sys.argv[1:]), on_step=crash)
"""

INFONCE = ["loss.name=infonce", "loss.temperature=0.05"]
# IFTCL with its queue (saved in checkpoints); fraternal views without augmentation, since the augmentation
# is seeded by sample key and the reordered single-process corpus has other keys.
IFTCL = ["loss.name=iftcl", "loss.queue_size=24", "loss.margin_low=0.05", "loss.margin_high=0.1",
         "loss.twins_weight=0.5", "data.augment.deletion_rate=0.0", "data.augment.repetition_rate=0.0",
         "data.augment.swap_rate=0.0"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("launch")
    corpus = write_corpus(tmp / "corpus.txt", num_lines=100)
    lines = corpus.read_text(encoding="utf-8").splitlines()
    per_rank = len(lines) // (WORLD * B_LOCAL)  # K
    ordered = []
    for step in range(per_rank):
        for r in range(WORLD):
            start = r * per_rank * B_LOCAL + step * B_LOCAL
            ordered += lines[start : start + B_LOCAL]
    ordered += lines[WORLD * per_rank * B_LOCAL :]
    single = tmp / "corpus_single.txt"
    single.write_text("\n".join(ordered) + "\n", encoding="utf-8")
    script = tmp / "crash_after_step.py"
    script.write_text(CRASH_SCRIPT.format(crash_at=CRASH_AT), encoding="utf-8")
    return {"tmp": tmp, "model": make_tiny_encoder_dir(tmp), "corpus": corpus, "single": single, "crash": script}


def _overrides(ws: dict, output_dir: Path, corpus: Path, batch_size: int, loss: list[str]) -> list[str]:
    return [
        f"output_dir={output_dir}",
        f"model.name_or_path={ws['model']}",
        "model.pooler=mean",  # random-init BERT: CLS vectors are all alike, means are not
        "model.max_length=16",
        "model.dropout=0.0",
        f"data.train={corpus}",
        f"data.batch_size={batch_size}",
        "data.shuffle_buffer=0",
        "optim.lr=1e-3",
        f"optim.max_steps={STEPS}",
        "optim.warmup_steps=0",
        "checkpoint_every=2",
        "log_every=1",
        "eval.sts_dir=",
        "tracking.enabled=false",
        *loss,
    ]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "MLFLOW_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_BUILD_OPS="0")
    return env


def _accelerate(config: str, program: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--num_processes", str(WORLD), *extra, *program]


def _run(cmd: list[str], log: Path, expect_rc: int = 0, timeout: int = 240) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if (rc == 0) != (expect_rc == 0):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"{' '.join(cmd[:8])} ... exited {rc}, expected {'0' if expect_rc == 0 else 'a failure'}:\n{tail}")
    return time.perf_counter() - t0


def _losses(output_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def _single_process(ws: dict, name: str, loss: list[str]) -> list[tuple[int, float]]:
    """The uninterrupted reference: one process, batch 2 x B_local, the reordered corpus, in this process."""
    from accelerate.state import AcceleratorState

    from trainer.config import load_config
    from trainer.engine import train

    AcceleratorState._reset_state(True)
    try:
        result = train(load_config(None, _overrides(ws, ws["tmp"] / name, ws["single"], WORLD * B_LOCAL, loss)))
    finally:
        AcceleratorState._reset_state(True)
    assert [s for s, _ in result.losses] == list(range(1, STEPS + 1))
    return result.losses


def _assert_same_losses(got, want, label: str) -> None:
    assert [s for s, _ in got] == [s for s, _ in want], label
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=RTOL), f"{label}: step {step} loss {a} != single-process {b}"


def _kill_and_resume(ws: dict, name: str, config: str, loss: list[str], launched: tuple[str, ...] = ()) -> None:
    """`launched`: overrides of the launched runs only (the single-process reference runs without them)."""
    out = ws["tmp"] / name
    overrides = _overrides(ws, out, ws["corpus"], B_LOCAL, loss) + list(launched)
    want = _single_process(ws, name + "_single", loss)
    # Training must actually move the loss, or equal losses would prove little.
    assert abs(want[-1][1] - want[0][1]) > 0.1

    t_crash = _run(_accelerate(config, [str(ws["crash"]), *overrides]), ws["tmp"] / f"{name}_crash.log", expect_rc=17)
    before = _losses(out)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
    # each rank's RNG state made it into the checkpoint, though rank 1 wrote it late (see CRASH_SCRIPT)
    state = out / "checkpoints" / "step_00000002" / "state"
    assert sorted(p.name for p in state.glob("random_states_*.pkl")) == [f"random_states_{r}.pkl" for r in range(WORLD)]
    _assert_same_losses(before, want[:CRASH_AT], f"{name} before the kill")

    t_resume = _run(_accelerate(config, ["-m", "trainer", "train", *overrides, "--resume"]),
                    ws["tmp"] / f"{name}_resume.log")
    # The resume drops the line of step 3 (after the checkpoint) and logs it again: every step once.
    after = _losses(out)
    assert after[:2] == before[:2]
    _assert_same_losses(after[2:], want[2:], f"{name} after --resume")  # steps 3..5: step 3 is redone
    print(f"{name}: killed run {t_crash:.1f} s, resumed run {t_resume:.1f} s")


def test_accelerate_ddp_two_processes_match_one_and_resume(workspace):
    _kill_and_resume(workspace, "ddp", "cpu_2proc.yaml", INFONCE)


def test_deepspeed_zero2_iftcl_matches_one_process_and_resumes(workspace):
    pytest.importorskip("deepspeed")
    _kill_and_resume(workspace, "zero2", "deepspeed_zero2.yaml", IFTCL)
    state = workspace["tmp"] / "zero2" / "checkpoints" / "step_00000005" / "state"
    # It really ran under ZeRO (a silent DDP fallback would save optimizer.bin instead).
    assert list(state.glob("**/zero_pp_rank_1_*optim_states.pt")), sorted(p.name for p in state.rglob("*"))


def test_deepspeed_zero3_cached_iftcl_matches_one_process_resumes_and_exports(workspace):
    """ZeRO-3 (parameters partitioned) with cached gradients: the single-process plain losses, an exact resume,
    and the model rank 0 saved from gathered weights loads in sentence-transformers."""
    pytest.importorskip("deepspeed")
    from sentence_transformers import SentenceTransformer

    from trainer.model import SentenceEncoder

    ws = workspace
    # hidden 256: the FFN matrices (256 x 512) exceed stage3_param_persistence_threshold (1e5 elements) in
    # zero3.json, so ZeRO-3 really partitions them (the hidden-64 encoder would stay whole on every rank).
    # lr 3e-4: at 1e-3 this wider encoder drives the loss to ~0.03, where float32 noise exceeds RTOL.
    wide = make_tiny_encoder_dir(ws["tmp"] / "wide", hidden=256)
    _kill_and_resume(ws, "zero3", "cpu_2proc_zero3.yaml", [*IFTCL, f"model.name_or_path={wide}", "optim.lr=3e-4"],
                     launched=("optim.mini_batch_size=5",))
    last = ws["tmp"] / "zero3" / "checkpoints" / "step_00000005"
    # ZeRO-3 writes each rank's parameter partition (ZeRO-2 writes one mp_rank_00_model_states.pt)
    assert list((last / "state").glob("**/zero_pp_rank_1_mp_rank_00_model_states.pt"))
    saved, original = SentenceEncoder.load(last / "model"), SentenceEncoder.load(wide)
    shapes = {n: p.shape for n, p in original.backbone.named_parameters()}
    assert {n: p.shape for n, p in saved.backbone.named_parameters()} == shapes
    sentences = ["the city of water", "a red house on the river", "music"]
    st = SentenceTransformer(str(ws["tmp"] / "zero3" / "export"), device="cpu")
    theirs = torch.as_tensor(st.encode(sentences, convert_to_numpy=True))
    torch.testing.assert_close(theirs, saved.encode(sentences), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(saved.encode(sentences), original.encode(sentences), atol=1e-3)  # it trained


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_cached_gradients_with_accumulation_match_one_process(workspace, stage):
    """Several `engine.backward` calls per optimizer step (chunks x micro-batches): the accumulation boundary
    only at the last chunk of the last micro-batch gives the single-process plain losses."""
    pytest.importorskip("deepspeed")
    ws, name = workspace, f"zero{stage}_cached"
    loss = [*INFONCE, "optim.grad_accum=2"]
    out = ws["tmp"] / name
    cmd = ["-m", "trainer", "train", *_overrides(ws, out, ws["corpus"], B_LOCAL, loss), "optim.mini_batch_size=3"]
    _run(_accelerate(f"deepspeed_zero{stage}.yaml", cmd), ws["tmp"] / f"{name}.log")
    _assert_same_losses(_losses(out), _single_process(ws, name + "_single", loss), name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_loopback_match_one_process(workspace):
    ws = workspace
    out = ws["tmp"] / "two_nodes"
    overrides = _overrides(ws, out, ws["corpus"], B_LOCAL, INFONCE)
    port = str(_free_port())
    procs, logs = [], []
    t0 = time.perf_counter()
    for machine in range(2):  # one process per "machine"; the same command with another machine_rank
        cmd = _accelerate("multi_node_2x8.yaml", ["-m", "trainer", "train", *overrides], "--num_machines", "2",
                          "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
                          "--main_process_port", port)
        logs.append(open(ws["tmp"] / f"node{machine}.log", "w"))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for fh in logs:
            fh.close()
    if codes != [0, 0]:
        tails = "\n".join((ws["tmp"] / f"node{m}.log").read_text(errors="replace")[-3000:] for m in range(2))
        pytest.fail(f"two-node launch exited {codes}:\n{tails}")
    want = _single_process(ws, "two_nodes_single", INFONCE)
    _assert_same_losses(_losses(out), want, "two machines")
    print(f"two machines: {time.perf_counter() - t0:.1f} s")
