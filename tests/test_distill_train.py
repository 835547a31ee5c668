"""The distillation trainer: every method preset, the metrics/run-folder contract, exact resume,
atomic checkpoints with keep-last-N, LoRA and full-model exports, the CLI, config errors,
and two gloo processes staying in sync. All on a tiny toy teacher written to a temp folder."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import warnings

import pytest
import torch
from PIL import Image

from rmd.cli import UserError, main
from rmd.distill.config import load_run_config, resolve
from rmd.lora import LORA_WEIGHT_NAME
from rmd.distill.train import (checkpoint_name, complete_checkpoints, image_grid, lora_checksum,
                               train)
from rmd.plan import PlanError
from rmd.recipes import load_recipe

from helpers import read_metrics, run_two_ranks, small

METRIC_KEYS = {"step", "loss_generator", "loss_fake", "stage", "step_index", "dm_norm", "lr", "seconds"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "already found a peft_config" (two adapters on purpose)
        yield


def recipe_file(tmp_path, teacher: str, **distill) -> str:
    d = {**dict(method="rmd", teacher=teacher, lora_rank=4, batch_size=2, max_steps=2, checkpoint_every=1,
                generator_lr=1e-2, sample_every=0), **distill}
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: toy-test\nbackbone: toy\nteacher_guidance_scale: 3.0\nteacher_steps: 50\n"
        "schedule: {steps: 4, resolutions: [16, 32], thresholds: [-2.5]}\n"
        f"distill: {json.dumps(d)}\n"
    )
    return str(path)


# --- every method -----------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["toy-rmd", "toy-dmd2", "toy-tdm", "toy-naive"])
def test_every_method_runs_and_writes_the_run_folder(recipe, teacher_dir, tmp_path):
    cfg = small(recipe, teacher_dir, max_steps=2, checkpoint_every=2, sample_every=2)
    run = str(tmp_path / "run")
    result = train(cfg, run, progress=False)
    lines = read_metrics(run)
    assert [m["step"] for m in lines] == [1, 2] and lines == result.metrics
    plan = cfg.plan()
    for m in lines:
        assert METRIC_KEYS <= set(m)
        assert all(math.isfinite(m[k]) for k in ("loss_generator", "loss_fake", "dm_norm"))
        assert m["loss_generator"] > 0 and m["loss_fake"] >= 0
        assert plan.steps[m["step_index"]].stage == m["stage"]
        assert m["lr"] == cfg.generator_lr and m["lr_fake"] == cfg.fake_lr
    if recipe in ("toy-dmd2", "toy-tdm"):
        assert len(plan.stages) == 1 and plan.steps[0].size == (32, 32)
    if recipe == "toy-rmd":
        assert all(m["stage"] == 0 for m in lines)  # warm-up: stage 1 only for the first iterations
    if recipe == "toy-tdm":
        assert cfg.fake_lr == pytest.approx(5 * cfg.generator_lr)
    if recipe == "toy-naive":
        assert not cfg.method_config.cross_resolution and plan.label == "2+2"

    # the resolved config next to the run and in the checkpoint re-creates the run config
    assert load_run_config(os.path.join(run, "config.yaml")) == cfg
    ckpts = complete_checkpoints(run)
    assert [s for s, _ in ckpts] == [2]
    assert load_run_config(os.path.join(ckpts[0][1], "config.yaml")) == cfg
    info = json.load(open(os.path.join(run, "run.json")))
    assert info["status"] == "finished" and info["method"] == cfg.method and info["plan"]["allocation"] == plan.label
    assert info["method_config"]["fake_updates"] == cfg.method_config.fake_updates

    # training moved both LoRAs off their zero init (B = 0 at the start)
    from safetensors.torch import load_file

    for role in ("generator", "fake"):
        state = load_file(os.path.join(ckpts[0][1], f"{role}.safetensors"))
        assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k), role

    grid = Image.open(os.path.join(run, "samples", f"{checkpoint_name(2)}.png"))
    assert grid.size == (2 * 32 + 3 * 2, 32 + 2 * 2)  # two 32 px images in a row, 2 px padding
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run, "tensorboard")))
    assert os.path.isfile(os.path.join(run, "export", "generator_lora", LORA_WEIGHT_NAME))


# --- resume -----------------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_resume_is_exact_and_checkpoints_are_atomic(teacher_dir, tmp_path):
    straight = str(tmp_path / "straight")
    train(small("toy-rmd", teacher_dir, max_steps=6, checkpoint_every=3), straight, progress=False)
    ref = read_metrics(straight)

    # a run that dies at step 5, after its checkpoint at step 3
    run = str(tmp_path / "run")

    def crash(line):
        if line["step"] == 5:
            raise Crash

    with pytest.raises(Crash):
        train(small("toy-rmd", teacher_dir, max_steps=6, checkpoint_every=3), run, progress=False, on_step=crash)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5]
    # debris a crash can leave: a half-written temp folder and an incomplete checkpoint folder
    root = os.path.join(run, "checkpoints")
    os.makedirs(os.path.join(root, ".tmp-step-00000005-999"))
    open(os.path.join(root, ".tmp-step-00000005-999", "generator.safetensors"), "w").write("garbage")
    os.makedirs(os.path.join(root, "step-00000005"))
    json.dump({"step": 5}, open(os.path.join(root, "step-00000005", "state.json"), "w"))
    assert [s for s, _ in complete_checkpoints(run)] == [3]

    # a fresh run into a used folder is refused; so is a resume with a changed setting
    with pytest.raises(UserError, match="--resume"):
        train(small("toy-rmd", teacher_dir, max_steps=6), run, progress=False)
    with pytest.raises(UserError, match="generator_lr"):
        train(small("toy-rmd", teacher_dir, max_steps=6, generator_lr=1e-3), run, resume=True, progress=False)

    result = train(small("toy-rmd", teacher_dir, max_steps=6, checkpoint_every=1, keep_last=2), run,
                   resume=True, progress=False)
    assert result.start_step == 3
    got = read_metrics(run)
    keys = ("step", "loss_generator", "loss_fake", "dm_norm", "stage", "step_index")
    assert [[m[k] for k in keys] for m in got] == [[m[k] for k in keys] for m in ref]  # exactly equal
    assert sorted(os.listdir(root)) == ["step-00000005", "step-00000006"]  # keep-last-2, debris gone
    from safetensors.torch import load_file

    for role in ("generator", "fake"):
        a = load_file(os.path.join(straight, "checkpoints", "step-00000006", f"{role}.safetensors"))
        b = load_file(os.path.join(root, "step-00000006", f"{role}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the generator's moving average -----------------------------------------------------------


def test_generator_ema_is_the_running_average_and_resumes_exactly(teacher_dir, tmp_path):
    """ema_k = d ema_(k-1) + (1 - d) w_k, checked from the files alone: the EMA at step 1 and the live
    weights of steps 2-4 give the EMA at step 4 in closed form. A run killed after step 2 and resumed
    ends on the same EMA; checkpoint sampling and the export use the average, not the last weights."""
    from safetensors.torch import load_file

    from rmd.distill.sample_cli import generator_weights, load_run

    d = 0.6
    with pytest.raises(PlanError, match="generator_ema"):
        small("toy-rmd", teacher_dir, generator_ema=1.0)  # an average that never moves is refused
    cfg = small("toy-rmd", teacher_dir, max_steps=4, checkpoint_every=1, keep_last=10, generator_ema=d,
                generator_lr=1e-2)
    run = str(tmp_path / "straight")
    train(cfg, run, progress=False)

    def ckpt(step: int, name: str) -> dict:
        return load_file(os.path.join(run, "checkpoints", checkpoint_name(step), name))

    ema1, ema4 = ckpt(1, "generator_ema.safetensors"), ckpt(4, "generator_ema.safetensors")
    live = {k: ckpt(k, "generator.safetensors") for k in (2, 3, 4)}
    for key in ema4:
        want = d ** 3 * ema1[key] + (1 - d) * (d ** 2 * live[2][key] + d * live[3][key] + live[4][key])
        torch.testing.assert_close(ema4[key], want, rtol=1e-5, atol=1e-7)
    moved = max((ema4[k] - live[4][k]).abs().max().item() for k in ema4 if "lora_B" in k)
    assert moved > 1e-4  # the average is not the last weights

    assert generator_weights(run, 4)[0].endswith("generator_ema.safetensors")
    averaged = probe(load_run(run, 4), teacher_dir)
    torch.testing.assert_close(probe(load_run(run, "final"), teacher_dir), averaged, rtol=0, atol=1e-6)
    student = load_run(run, 4)
    from rmd.distill.train import load_lora_weights

    load_lora_weights(student.base, "generator", os.path.join(run, "checkpoints", checkpoint_name(4),
                                                              "generator.safetensors"))
    assert (probe(student, teacher_dir) - averaged).abs().max() > 1e-5

    resumed = str(tmp_path / "resumed")

    def crash(line):
        if line["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, resumed, progress=False, on_step=crash)
    shutil.rmtree(os.path.join(resumed, "checkpoints", checkpoint_name(3)))  # as if killed before saving 3
    assert train(cfg, resumed, resume=True, progress=False).start_step == 2
    got = load_file(os.path.join(resumed, "checkpoints", checkpoint_name(4), "generator_ema.safetensors"))
    assert got.keys() == ema4.keys() and all(torch.equal(got[k], ema4[k]) for k in got)


def test_ema_swap_restores_the_live_weights_bit_for_bit():
    from rmd.distill.train import GeneratorEMA

    from helpers import tiny_base

    base = tiny_base()
    params = base.parameters("generator")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    ema = GeneratorEMA(base, 0.5)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.mul_(3.0)  # live weights move on; the average is at half the distance after one update
    ema.update()
    live = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    with pytest.raises(RuntimeError):
        with ema.applied():
            for p, b in zip(params, before):
                torch.testing.assert_close(p.detach(), 2.0 * b, rtol=1e-6, atol=0)  # 0.5 b + 0.5 * 3 b
            raise RuntimeError("sampling failed")
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, live))
    assert [p.requires_grad for p in params] == flags  # the role's training state is untouched


# --- a finished run: exports and the sample command ------------------------------------------


@pytest.fixture(scope="module")
def trained_run(teacher_dir, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("cli")
    run = str(tmp / "run")
    assert main(["distill", "--config", recipe_file(tmp, teacher_dir), "--out", run, "--max-steps", "3",
                 "--checkpoint-every", "2", "--quiet"]) == 0
    return run


def probe(student_or_model, teacher_dir: str):
    """Generator-role x0 predictions on a fixed noisy batch with real prompt conditioning."""
    from rmd.denoisers import from_model
    from rmd.toy.teacher import load_teacher

    text = load_teacher(teacher_dir).text
    cond = text.encode(["a red circle on the left on a black background",
                        "two blue squares at the top , white background"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.9, 0.4])
    model = getattr(student_or_model, "base", None)
    model = model.model if model is not None else student_or_model
    with torch.no_grad():
        return from_model(model, vae_scale_factor=1)(x, t, cond)[0]


def test_metrics_contract_of_the_cli_run(trained_run):
    lines = read_metrics(trained_run)
    assert [m["step"] for m in lines] == [1, 2, 3] and all(METRIC_KEYS <= set(m) for m in lines)
    assert [s for s, _ in complete_checkpoints(trained_run)] == [2, 3]  # every 2, and the last step


def test_lora_export_round_trip(trained_run, teacher_dir):
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from rmd.distill.sample_cli import load_run
    from rmd.toy.teacher import load_teacher

    student = load_run(trained_run, "latest")  # the generator as trained (final checkpoint)
    want = probe(student, teacher_dir)
    teacher_out = probe(load_teacher(teacher_dir).transformer, teacher_dir)
    assert (want - teacher_out).abs().max() > 1e-4  # the LoRA is not a no-op

    export = os.path.join(trained_run, "export", "generator_lora")
    # diffusers: load_lora_adapter reads the file, its "transformer." prefix and the rank/alpha metadata
    fresh = load_teacher(teacher_dir).transformer
    fresh.load_lora_adapter(export, prefix="transformer", weight_name=LORA_WEIGHT_NAME, adapter_name="distilled")
    torch.testing.assert_close(probe(fresh, teacher_dir), want, rtol=0, atol=1e-6)

    # peft: the same weights through set_peft_model_state_dict
    path = os.path.join(export, LORA_WEIGHT_NAME)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    state = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    fresh = load_teacher(teacher_dir).transformer
    fresh.add_adapter(LoraConfig(r=meta["transformer.r"], lora_alpha=meta["transformer.lora_alpha"],
                                 target_modules=meta["transformer.target_modules"]), adapter_name="distilled")
    result = set_peft_model_state_dict(fresh, state, adapter_name="distilled")
    assert not result.unexpected_keys
    torch.testing.assert_close(probe(fresh, teacher_dir), want, rtol=0, atol=1e-6)
    # and rmd's own loader of the export agrees with the checkpoint
    torch.testing.assert_close(probe(load_run(trained_run, "final"), teacher_dir), want, rtol=0, atol=0)


def test_full_model_export_equals_the_generator(trained_run, teacher_dir):
    from rmd.distill.sample_cli import load_run
    from rmd.toy.teacher import load_teacher

    want = probe(load_run(trained_run, "latest"), teacher_dir)
    merged = load_teacher(os.path.join(trained_run, "export", "generator_full"))  # a complete toy model folder
    assert not any("lora" in n for n, _ in merged.transformer.named_parameters())
    got = probe(merged.transformer, teacher_dir)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)  # W + BA merged: only rounding differs
    assert (want - probe(load_teacher(teacher_dir).transformer, teacher_dir)).abs().max() > 100 * 2e-5


def test_sample_command(trained_run, tmp_path, capsys):
    from rmd.distill.sample_cli import sample_run

    prompt = "a green square in the middle , gray background"
    out = str(tmp_path / "one.png")
    assert main(["sample", "--run", trained_run, "--prompt", prompt, "--out", out, "--seed", "7"]) == 0
    img = torch.tensor(list(Image.open(out).getdata()), dtype=torch.uint8)
    want = image_grid(sample_run(trained_run, [prompt], [7]))
    assert Image.open(out).size == (32, 32)
    assert torch.equal(img, torch.tensor(list(want.getdata()), dtype=torch.uint8))
    assert main(["sample", "--run", trained_run, "--prompt", prompt, "--out", str(tmp_path / "g.png"),
                 "--num-images", "3", "--checkpoint", "2"]) == 0
    assert Image.open(tmp_path / "g.png").size == (3 * 32 + 4 * 2, 32 + 2 * 2)
    capsys.readouterr()
    assert main(["sample", "--run", trained_run, "--prompt", prompt, "--out", out, "--checkpoint", "99"]) == 2
    assert "no checkpoint step-00000099" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path), "--prompt", prompt, "--out", out]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_sample_prompt_file_per_image_files_and_process_split(trained_run, tmp_path, capsys, monkeypatch):
    """--prompts: one PNG + JSON per prompt, seeds from the file or --seed + index, and the same
    images whether one process writes them all or two processes (RANK / WORLD_SIZE) split them."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle on the left , black background", "seed": 11}\n\n'
                       '{"prompt": "two blue squares at the top , white background"}\n'
                       '{"prompt": "a green triangle in the middle , gray background"}\n')
    one = tmp_path / "one"
    assert main(["sample", "--run", trained_run, "--prompts", str(prompts), "--out", str(one), "--seed", "5",
                 "--batch-size", "2"]) == 0
    assert "1 blank line(s) skipped" in capsys.readouterr().out
    metas = [json.load(open(one / f"{i:06d}.json")) for i in range(3)]
    assert [m["seed"] for m in metas] == [11, 6, 7] and [m["line"] for m in metas] == [1, 3, 4]
    two = tmp_path / "two"
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["sample", "--run", trained_run, "--prompts", str(prompts), "--out", str(two), "--seed", "5"]) == 0
    for i in range(3):
        a = torch.tensor(list(Image.open(one / f"{i:06d}.png").getdata()))
        b = torch.tensor(list(Image.open(two / f"{i:06d}.png").getdata()))
        assert torch.equal(a, b)
    from rmd.distill.sample_cli import sample_run

    want = image_grid(sample_run(trained_run, [metas[1]["prompt"]], [6]))
    assert torch.equal(torch.tensor(list(Image.open(one / "000001.png").getdata())),
                       torch.tensor(list(want.getdata())))


def test_distill_command_errors(teacher_dir, tmp_path, capsys):
    assert main(["distill", "--out", str(tmp_path / "r")]) == 2
    assert "--recipe" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(recipe_file(tmp_path, teacher_dir)).read().replace('"lora_rank"', '"lora_rnak"'))
    assert main(["distill", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "distill.lora_rnak: unknown key" in err and "Traceback" not in err
    assert main(["distill", "--recipe", "sdxl", "--out", str(tmp_path / "r")]) == 2
    assert "distill.teacher" in capsys.readouterr().err


# --- config -----------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path, teacher_dir):
    base = open(recipe_file(tmp_path, teacher_dir)).read()
    path = tmp_path / "c.yaml"
    cases = [
        ('"batch_size": 2', '"batch_size": "two"', "distill.batch_size"),
        ('"method": "rmd"', '"method": "dmd3"', "distill.method"),
        ('"lora_rank": 4', '"lora_rank": 4, "method_config": {"eta": 3}', "distill.method_config.eta"),
    ]
    for old, new, key in cases:
        assert old in base
        path.write_text(base.replace(old, new))
        with pytest.raises(PlanError, match=key.replace(".", r"\.")):
            load_recipe(str(path))
    path.write_text(base.replace('"lora_rank": 4', '"lora_rank": 4, "method_config": {"fake_update": 2}'))
    with pytest.raises(PlanError, match=r"distill\.method_config\.fake_update: unknown key"):
        load_recipe(str(path))
    with pytest.raises(PlanError, match="stage_loss_weights"):
        small("toy-rmd", teacher_dir, stage_loss_weights=[1.0])
    with pytest.raises(PlanError, match="max_steps"):
        small("toy-rmd", teacher_dir, max_steps=0)
    # a run's config.yaml is validated the same way
    cfg_path = tmp_path / "config.yaml"
    from rmd.distill.config import write_config

    write_config(small("toy-rmd", teacher_dir), str(cfg_path))
    cfg_path.write_text(cfg_path.read_text() + "warmup: 3\n")
    with pytest.raises(PlanError, match="warmup: unknown key"):
        load_run_config(str(cfg_path))


def test_config_resolution(teacher_dir, tmp_path):
    rmd = resolve(load_recipe("toy-rmd"), teacher=teacher_dir)
    assert rmd.fake_lr == 1e-3 and rmd.method_config.warmup_iters == 50  # the recipe's explicit value
    assert rmd.method_config.guidance_scale == load_recipe("toy-rmd").teacher_guidance_scale
    # without a fake_lr in the recipe: the generator's, or 5x it for TDM
    plain = load_run_config(recipe_file(tmp_path, teacher_dir))
    assert plain.fake_lr == plain.generator_lr
    tdm = load_run_config(recipe_file(tmp_path, teacher_dir, method="tdm"))
    assert tdm.fake_lr == pytest.approx(5 * tdm.generator_lr) and tdm.method_config.eta == 1.0
    assert resolve(load_recipe("toy-tdm"), teacher=teacher_dir, fake_lr=1e-5).fake_lr == 1e-5
    dmd2 = resolve(load_recipe("toy-dmd2"), teacher=teacher_dir)
    assert dmd2.method_config.fake_updates == 5 and dmd2.method_config.tau_mode == "full"
    two = resolve(load_recipe("toy-dmd2"), teacher=teacher_dir, method_config={"fake_updates": 2})
    assert two.method_config.fake_updates == 2 and two.method_config.tau_mode == "full"
    no_clip = resolve(load_recipe("toy-rmd"), teacher=teacher_dir, method_config={"snr_clip": None})
    assert no_clip.method_config.snr_clip is None  # an explicit null overrides the preset's 5.0
    assert os.path.isabs(rmd.teacher)


# --- two processes ----------------------------------------------------------------------------


def _rank_main(rank: int, world: int, port: int, cfg, out: str) -> None:
    # forked from pytest: the parent's accelerate singleton must not leak into this process
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)  # as DataLoader workers do: no OpenMP pool in a forked child
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    AcceleratorState._reset_state(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, out, progress=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks the test process (Linux)")
def test_two_gloo_processes_stay_in_sync(teacher_dir, tmp_path):
    """2 CPU processes (gloo): each draws its own prompts and noise, gradients are averaged, and
    the LoRA weights stay bit-identical (checked by the trainer at every checkpoint via a hash per rank).

    The processes are forked (no second import of torch/diffusers: seconds instead of a minute);
    `torchrun --nproc_per_node 2 -m rmd.cli distill ...` runs the same code path.
    """
    cfg = small("toy-rmd", teacher_dir, max_steps=3, checkpoint_every=3, method_config={"warmup_iters": 0})
    run = str(tmp_path / "run")
    run_two_ranks(_rank_main, cfg, run)
    state = json.load(open(os.path.join(run, "checkpoints", checkpoint_name(3), "state.json")))
    assert state["world_size"] == 2
    assert len(state["rank_checksums"]) == 2 and state["rank_checksums"][0] == state["rank_checksums"][1]
    lines = read_metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 3]  # rank 0 logs, once per iteration
    # the ranks really saw different data (so identical weights are the sync's doing) ...
    assert all(m["loss_generator_per_rank"][0] != m["loss_generator_per_rank"][1] for m in lines)
    assert lines[0]["loss_generator"] == pytest.approx(sum(lines[0]["loss_generator_per_rank"]) / 2)
    # ... and the saved weights are the ones whose hash every rank reported
    from rmd.distill.sample_cli import load_run
    from rmd.distill.train import load_checkpoint

    student = load_run(run, "latest")
    load_checkpoint(os.path.join(run, "checkpoints", checkpoint_name(3)), student)
    assert lora_checksum(student.lora_params()) == state["rank_checksums"][0]


def test_sampling_follows_the_training_trajectory_unless_the_recipe_says_otherwise(tmp_path, teacher_dir):
    rmd = load_run_config("toy-rmd", teacher=teacher_dir)
    assert (rmd.sampling.eta, rmd.sampling.gamma) == (rmd.method_config.eta, rmd.method_config.gamma) == (0.0, 0.0)
    tdm = load_run_config("toy-tdm", teacher=teacher_dir)
    assert (tdm.sampling.eta, tdm.sampling.gamma) == (1.0, 1.0)
    over = load_run_config("toy-rmd", teacher=teacher_dir, method_config={"eta": 0.5, "gamma": 0.3})
    assert (over.sampling.eta, over.sampling.gamma) == (0.5, 0.3)  # an override of the training value moves the default with it
    path = recipe_file(tmp_path, teacher_dir)
    text = open(path).read().replace("distill:", "sampling: {eta: 0.9}\ndistill:")
    open(path, "w").write(text)
    explicit = load_run_config(path)
    assert (explicit.sampling.eta, explicit.sampling.gamma) == (0.9, 0.2)  # the method default, untouched


def test_set_options_override_single_values(tmp_path, teacher_dir, capsys):
    from rmd.distill.train import parse_set_options

    got = parse_set_options(["method_config.gamma=0.5", "batch_size=4", "method_config.snr_clip=null"])
    assert got == {"method_config": {"gamma": 0.5, "snr_clip": None}, "batch_size": 4}
    cfg = load_run_config("toy-rmd", teacher=teacher_dir, **got)
    assert (cfg.method_config.gamma, cfg.batch_size, cfg.method_config.snr_clip) == (0.5, 4, None)
    out = str(tmp_path / "run")
    for bad, words in ((["batch_size"], "KEY=VALUE"), (["schedule.steps=3"], "only top-level"),
                       (["method_config.nosuch=1"], "nosuch"), (["batch_size=-1"], "batch_size"),
                       (["teacher_guidance_scale=7"], "--config FILE"), (["method_config=5"], "--config FILE")):
        args = ["distill", "--recipe", "toy-rmd", "--teacher", teacher_dir, "--out", out]
        for item in bad:
            args += ["--set", item]
        assert main(args) == 2
        assert words in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # rejected before any work


def test_overwrite_starts_again_and_keeps_foreign_files(teacher_dir, tmp_path):
    run = tmp_path / "run"
    cfg = recipe_file(tmp_path, teacher_dir)
    assert main(["distill", "--config", cfg, "--out", str(run), "--max-steps", "2", "--quiet"]) == 0
    (run / "notes.txt").write_text("mine")
    first = read_metrics(str(run))
    assert main(["distill", "--config", cfg, "--out", str(run), "--max-steps", "1", "--quiet", "--overwrite"]) == 0
    assert [m["step"] for m in read_metrics(str(run))] == [1]  # started again from step 0
    assert read_metrics(str(run))[0]["loss_generator"] == first[0]["loss_generator"]
    assert (run / "notes.txt").read_text() == "mine"
    assert [s for s, _ in complete_checkpoints(str(run))] == [1]
    # an --overwrite that cannot start (here: no teacher there) leaves the old run as it was
    assert main(["distill", "--config", cfg, "--out", str(run), "--max-steps", "1", "--quiet", "--overwrite",
                 "--teacher", str(tmp_path / "missing")]) == 2
    assert [m["step"] for m in read_metrics(str(run))] == [1] and complete_checkpoints(str(run))
