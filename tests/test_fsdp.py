"""FSDP (``sharding: fsdp``): two gloo processes with the base network and both LoRAs sharded give the
same run as two unsharded processes -- losses, checkpoints, sample grids and exports -- and a run
resumes across the two modes (checkpoints hold whole tensors either way)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from rmd.distill.train import checkpoint_name, train

from helpers import read_metrics, run_two_ranks, small

pytestmark = pytest.mark.slow


def _rank_main(rank: int, world: int, port: int, cfg, out: str) -> None:
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    AcceleratorState._reset_state(True)
    resume = os.path.isdir(os.path.join(out, "checkpoints"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, out, progress=False, resume=resume)


def _cfg(teacher: str, sharding: str):
    # the sharded run also recomputes activations (gradient checkpointing): the same numbers either way
    # with a generator EMA: its averages are shards like the parameters, and the export is the average
    return small("toy-rmd", teacher, max_steps=3, checkpoint_every=2, sample_every=3, sharding=sharding,
                 gradient_checkpointing=sharding == "fsdp", method_config={"warmup_iters": 0}, generator_ema=0.5)


@pytest.fixture(scope="module")
def runs(teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    out = {}
    for name in ("none", "fsdp"):
        out[name] = str(root / name)
        run_two_ranks(_rank_main, _cfg(teacher_dir, name), out[name])
    return out


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_sharded_run_equals_the_unsharded_one(runs):
    plain, sharded = read_metrics(runs["none"]), read_metrics(runs["fsdp"])
    assert [m["step"] for m in sharded] == [1, 2, 3]
    for a, b in zip(plain, sharded):
        assert (a["stage"], a["step_index"]) == (b["stage"], b["step_index"])
        assert b["loss_generator"] == pytest.approx(a["loss_generator"], rel=1e-5)
        assert b["loss_fake"] == pytest.approx(a["loss_fake"], rel=1e-5)
        assert b["loss_generator_per_rank"][0] != b["loss_generator_per_rank"][1]  # the ranks saw different data
    for step in (2, 3):
        for role in ("generator", "fake", "generator_ema"):
            _close(*(load_file(os.path.join(runs[m], "checkpoints", checkpoint_name(step), f"{role}.safetensors"))
                     for m in ("none", "fsdp")))
    state = json.load(open(os.path.join(runs["fsdp"], "checkpoints", checkpoint_name(3), "state.json")))
    assert state["sharding"] == "fsdp" and state["rank_checksums"][0] == state["rank_checksums"][1]
    lora = [load_file(os.path.join(runs[m], "export", "generator_lora", "pytorch_lora_weights.safetensors"))
            for m in ("none", "fsdp")]
    _close(*lora)
    ema = load_file(os.path.join(runs["none"], "checkpoints", checkpoint_name(3), "generator_ema.safetensors"))
    _close({k.removeprefix("transformer."): v for k, v in lora[0].items()}, ema)  # the export is the average
    full = [load_file(os.path.join(runs[m], "export", "generator_full", "transformer",
                                   "diffusion_pytorch_model.safetensors")) for m in ("none", "fsdp")]
    _close(*full)  # merged on a fresh copy of the base (sharded) == deep copy of the live model (plain)
    assert os.path.isfile(os.path.join(runs["fsdp"], "samples", f"{checkpoint_name(3)}.png"))


def test_resume_crosses_between_sharded_and_unsharded(runs, teacher_dir, tmp_path):
    """The plain run's step-2 checkpoint, resumed sharded, reaches the plain run's step 3."""
    run = str(tmp_path / "resumed")
    shutil.copytree(runs["none"], run)
    shutil.rmtree(os.path.join(run, "checkpoints", checkpoint_name(3)))
    shutil.rmtree(os.path.join(run, "export"))
    run_two_ranks(_rank_main, _cfg(teacher_dir, "fsdp"), run)
    last = read_metrics(run)[-1]
    want = read_metrics(runs["none"])[-1]
    assert last["step"] == 3 and last["loss_generator"] == pytest.approx(want["loss_generator"], rel=1e-5)
    for name in ("generator", "generator_ema"):  # the EMA goes on from the checkpoint's whole tensors, sharded
        _close(*(load_file(os.path.join(r, "checkpoints", checkpoint_name(3), f"{name}.safetensors"))
                 for r in (run, runs["none"])))


def test_a_real_family_shards_too(tmp_path, monkeypatch):
    """Tiny SDXL pipeline folder, two processes: the embedding cache is built once (rank 0) and the
    sharded UNet run equals the unsharded one."""
    from rmd.distill.config import load_run_config
    from rmd.tiny_pipelines import save_tiny_pipeline

    model = save_tiny_pipeline("sdxl", str(tmp_path / "model"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\na green house\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nbackbone: sdxl\nteacher_guidance_scale: 5.0\nteacher_steps: 4\n"
                      "schedule:\n  steps: 4\n  resolutions: [32, 64]\n  thresholds: [-2.5]\n"
                      "distill:\n  lora_rank: 4\n  batch_size: 1\n  max_steps: 2\n  checkpoint_every: 2\n"
                      "  sample_every: 0\n  generator_lr: 1.0e-3\n  method_config:\n    warmup_iters: 0\n")
    monkeypatch.setenv("RMD_CACHE", str(tmp_path / "cache"))
    runs = {}
    for sharding in ("none", "fsdp"):
        cfg = load_run_config(str(recipe), teacher=model, prompts=str(prompts), sharding=sharding)
        runs[sharding] = str(tmp_path / sharding)
        run_two_ranks(_rank_main, cfg, runs[sharding])
    assert len(os.listdir(tmp_path / "cache" / "embeddings")) == 1  # one cache, shared by both runs
    a, b = read_metrics(runs["none"]), read_metrics(runs["fsdp"])
    assert [m["loss_generator"] for m in b] == pytest.approx([m["loss_generator"] for m in a], rel=1e-5)
    _close(*(load_file(os.path.join(r, "export", "generator_lora", "pytorch_lora_weights.safetensors"))
             for r in runs.values()))


def test_shipped_accelerate_config_asks_for_fsdp():
    """The accelerate config shipped beside the recipes parses as accelerate reads it, with the FSDP type
    that makes `rmd distill` shard (on GPUs; accelerate ignores FSDP on CPU, so the 2-process tests above
    use sharding: fsdp)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from rmd.recipes import RECIPE_DIR

    cfg = load_config_from_file(os.path.join(RECIPE_DIR, "accelerate", "fsdp.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.fsdp_config["fsdp_version"] == 2
    assert cfg.mixed_precision == "no"  # the run config's mixed_precision decides, not accelerate's


def _clip_rank(rank: int, world: int, port: int, max_norm: float, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from rmd.distill.sharding import clip_grad_norm, full

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        # odd sizes: the shards are uneven; the last layer stays a plain (replicated) parameter
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in
                 enumerate(model.parameters())]
        fully_shard(model[0])
        fully_shard(model[1])
        for p, g in zip(model.parameters(), grads):
            p.grad = torch.distributed.tensor.distribute_tensor(g, p.device_mesh, p.placements) \
                if hasattr(p, "device_mesh") else g.clone()
        norm = clip_grad_norm(list(model.parameters()), max_norm)
        clipped = [full(p.grad).clone() for p in model.parameters()]
        if rank == 0:
            torch.save({"norm": norm, "clipped": clipped}, out)
    finally:
        dist.destroy_process_group()


def test_sharded_gradient_clipping_equals_torch_on_whole_tensors(tmp_path):
    # independent truth: torch.nn.utils.clip_grad_norm_ on the same gradients, unsharded
    from helpers import run_two_ranks

    out = str(tmp_path / "clip.pt")
    run_two_ranks(_clip_rank, 0.5, out)
    got = torch.load(out)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
    want_norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.5)
    assert want_norm > 2.0  # clipping is active
    assert torch.allclose(got["norm"], want_norm, rtol=1e-5)
    for a, p in zip(got["clipped"], model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-5, atol=1e-7)
