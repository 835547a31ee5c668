"""Crash safety and numerical faults: SIGKILL at random moments (including while a checkpoint is
being written) and SIGTERM never cost the run, and non-finite losses or gradients are skipped,
counted and, in a long streak, stop training with the last good checkpoint intact."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from rmd.cli import UserError
from rmd.distill import algorithm
from rmd.distill.config import write_config
from rmd.distill.train import CHECKPOINT_PAUSE_ENV, complete_checkpoints, lora_checksum, train

from helpers import read_metrics, run_two_ranks, small

KEYS = ("step", "loss_generator", "loss_fake", "dm_norm", "stage", "step_index")
STEPS = 8  # in-process fault tests
LONG = 40  # the runs that get killed: long enough to be hit several times


def _cfg(teacher_dir, **kw):
    opts = dict(max_steps=STEPS, checkpoint_every=2, keep_last=2, method_config={"warmup_iters": 0})
    return small("toy-rmd", teacher_dir, **{**opts, **kw})


@pytest.fixture(scope="module")
def reference(teacher_dir, tmp_path_factory):
    """The long run, never interrupted: its metrics and its seconds per iteration."""
    run = str(tmp_path_factory.mktemp("straight"))
    start = time.perf_counter()
    train(_cfg(teacher_dir, max_steps=LONG), run, progress=False)
    per_step = (time.perf_counter() - start) / LONG
    return [[m[k] for k in KEYS] for m in read_metrics(run)], per_step


def _launch(config: str, run: str, capture: bool = True, pause: float = 0.0) -> subprocess.Popen:
    # the same thread count as this process, whose in-process run is the reference
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), CHECKPOINT_PAUSE_ENV: str(pause)}
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "rmd.cli", "distill", "--config", config, "--out", run, "--resume",
                             "--quiet"], env=env, stdout=out, stderr=out, text=True)


def _lines(run: str) -> int:
    path = os.path.join(run, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(teacher_dir, tmp_path, reference):
    reference, per_step = reference
    config = str(tmp_path / "config.yaml")
    write_config(_cfg(teacher_dir, max_steps=LONG), config)
    run = str(tmp_path / "run")
    rng = random.Random(0)
    ckpt_root = os.path.join(run, "checkpoints")
    kills = []
    for attempt in range(4):
        # checkpoints pause 0.2 s before they are published, so a kill can land inside the write
        proc = _launch(config, run, capture=False, pause=0.2)
        before = _lines(run)
        # wait until the run is training, then kill it: at a random moment, or (attempts 1 and 3) the
        # moment a checkpoint's temp folder appears, i.e. in the middle of writing it
        deadline = time.time() + 300
        while _lines(run) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if attempt % 2:
            while proc.poll() is None and time.time() < deadline and not (
                    os.path.isdir(ckpt_root) and any(n.startswith(".tmp-") for n in os.listdir(ckpt_root))):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 6 * per_step))
        if proc.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_write = os.path.isdir(ckpt_root) and any(n.startswith(".tmp-") for n in os.listdir(ckpt_root))
        kills.append((_lines(run), mid_write))
        # whatever is on disk, only complete checkpoints count
        for step, path in complete_checkpoints(run):
            assert json.load(open(os.path.join(path, "state.json")))["step"] == step
    assert len(kills) >= 2, "the run finished too fast to be interrupted"
    assert any(mid for _, mid in kills), f"no kill landed while a checkpoint was being written: {kills}"
    proc = _launch(config, run)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    got = [[m[k] for k in KEYS] for m in read_metrics(run)]
    assert got == reference  # exactly: every resume continued where the last complete checkpoint stopped
    assert json.load(open(os.path.join(run, "run.json")))["status"] == "finished"


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(teacher_dir, tmp_path, reference):
    reference, _ = reference
    config = str(tmp_path / "config.yaml")
    write_config(_cfg(teacher_dir, max_steps=LONG, checkpoint_every=100), config)  # no periodic checkpoint
    run = str(tmp_path / "run")
    proc = _launch(config, run)
    deadline = time.time() + 300
    while _lines(run) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    info = json.load(open(os.path.join(run, "run.json")))
    assert info["status"] == "stopped" and "stopped by SIGTERM at step" in out and "--resume" in out
    saved = [s for s, _ in complete_checkpoints(run)]
    assert saved == [info["step"]] and 3 <= info["step"] < LONG
    assert not os.path.exists(os.path.join(run, "export"))  # a stopped run is not exported as finished
    proc = _launch(config, run)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert [[m[k] for k in KEYS] for m in read_metrics(run)] == reference


class _Inject:
    """Replace a loss function of the algorithm so that chosen calls return NaN per sample."""

    def __init__(self, fn, bad_calls):
        self.fn, self.bad, self.calls = fn, set(bad_calls), 0

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls += 1
        return out * float("nan") if self.calls in self.bad or "all" in self.bad and self.calls > 2 else out


def test_nonfinite_updates_are_skipped_and_counted(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(algorithm, "dm_generator_loss", _Inject(algorithm.dm_generator_loss, {3, 4}))
    monkeypatch.setattr(algorithm, "fake_score_loss", _Inject(algorithm.fake_score_loss, {6}))
    sums = []

    def watch(line):
        sums.append((lora_checksum(student_params["generator"]()), lora_checksum(student_params["fake"]())))

    student_params = {}
    real_build = __import__("rmd.distill.train", fromlist=["build_student"]).build_student

    def build(*a, **k):
        st = real_build(*a, **k)
        student_params["generator"] = lambda: st.base.parameters("generator")
        student_params["fake"] = lambda: st.base.parameters("fake")
        return st

    monkeypatch.setattr("rmd.distill.train.build_student", build)
    run = str(tmp_path / "run")
    train(_cfg(teacher_dir), run, progress=False, on_step=watch)
    lines = read_metrics(run)
    assert [m["skipped_generator"] for m in lines] == [0, 0, 1, 1, 0, 0, 0, 0]
    assert [m["skipped_fake"] for m in lines] == [0, 0, 0, 0, 0, 1, 0, 0]
    assert lines[-1]["faulty_iterations"] == 3
    # a skipped update leaves its weights exactly as they were; the other role still trains
    assert sums[2][0] == sums[1][0] and sums[3][0] == sums[1][0] and sums[4][0] != sums[3][0]
    assert sums[2][1] != sums[1][1] and sums[5][1] == sums[4][1]
    # and nothing non-finite ever reached the saved weights
    from safetensors.torch import load_file

    for _, path in complete_checkpoints(run):
        for role in ("generator", "fake"):
            assert all(torch.isfinite(v).all() for v in load_file(os.path.join(path, f"{role}.safetensors")).values())


def test_a_streak_of_faults_stops_training_and_keeps_the_last_good_checkpoint(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(algorithm, "dm_generator_loss", _Inject(algorithm.dm_generator_loss, {"all"}))
    run = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"step 5: 3 iterations in a row had a non-finite loss or gradient") as e:
        train(_cfg(teacher_dir, max_bad_steps=3), run, progress=False)
    assert "step-00000002" in str(e.value) or "step-00000004" in str(e.value)
    assert json.load(open(os.path.join(run, "run.json")))["status"] == "failed"
    steps = [s for s, _ in complete_checkpoints(run)]
    assert steps and max(steps) <= 4
    # the generator never moved after step 2: every checkpoint since holds step 2's generator
    from safetensors.torch import load_file

    ckpts = dict(complete_checkpoints(run))
    g2 = load_file(os.path.join(ckpts[min(steps)], "generator.safetensors"))
    for s in steps:
        g = load_file(os.path.join(ckpts[s], "generator.safetensors"))
        assert all(torch.equal(g[k], g2[k]) for k in g2)


def _rank_with_nan_loss(rank: int, world: int, port: int, cfg, out: str) -> None:
    """A rank whose generator loss is NaN at its 2nd iteration while its gradients stay finite."""
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    AcceleratorState._reset_state(True)
    if rank == 1:
        real, calls = algorithm.dm_generator_loss, [0]

        def nan_value_only(*args, **kwargs):
            out = real(*args, **kwargs)
            calls[0] += 1
            # a constant: the value turns NaN, the gradient does not
            return out + torch.full_like(out, float("nan")).detach() if calls[0] == 2 else out

        algorithm.dm_generator_loss = nan_value_only
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("ignore")
        train(cfg, out, progress=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks the test process (Linux)")
def test_ranks_skip_together(teacher_dir, tmp_path):
    """One rank's non-finite loss (with finite gradients) makes every rank skip that update;
    otherwise the weights would part and the checkpoint's per-rank hashes would differ."""
    cfg = _cfg(teacher_dir, max_steps=3, checkpoint_every=3)
    run = str(tmp_path / "run")
    run_two_ranks(_rank_with_nan_loss, cfg, run)
    lines = read_metrics(run)
    assert [m["skipped_generator"] for m in lines] == [0, 1, 0]  # rank 0's loss was finite, yet it skipped
    state = json.load(open(os.path.join(run, "checkpoints", "step-00000003", "state.json")))
    assert state["rank_checksums"][0] == state["rank_checksums"][1]
