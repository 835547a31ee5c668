"""The four real families end to end, on tiny pipelines of the real diffusers classes saved locally:

`rmd distill --config <family recipe> --model FOLDER --prompts FILE` -> export -> RMDPipeline and
the stock diffusers pipeline with the exported LoRA; the embedding cache; 2-process sampling.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rmd.cli import main
from rmd.tiny_pipelines import save_tiny_pipeline

pytestmark = pytest.mark.slow

FAMILIES = {  # backbone -> (tiny builder name, resolutions, frames)
    "sdxl": ("sdxl", [32, 64], None),
    "pixart-sigma": ("pixart", [32, 64], None),
    "sd3": ("sd3", [32, 64], None),
    "wan": ("wan", [32, 64], 5),
}
PROMPTS = ["a red cat", "a blue dog on grass", "a green house by a lake", "two yellow birds"]


def _recipe(path: str, backbone: str) -> str:
    _, res, frames = FAMILIES[backbone]
    text = (f"name: tiny-{backbone}\nbackbone: {backbone}\nteacher_guidance_scale: 4.0\nteacher_steps: 8\n"
            + (f"frames: {frames}\n" if frames else "")
            + f"schedule:\n  steps: 4\n  resolutions: {res}\n  thresholds: [-2.5]\n"
            "distill:\n  lora_rank: 4\n  batch_size: 2\n  max_steps: 3\n  checkpoint_every: 3\n  sample_every: 3\n"
            "  num_sample_images: 2\n  generator_lr: 1.0e-3\n  fake_lr: 1.0e-3\n  method_config:\n    warmup_iters: 1\n")
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory):
    """(backbone, model folder, run folder, prompt file): a finished 3-step run."""
    backbone = request.param
    root = tmp_path_factory.mktemp(backbone.replace("-", ""))
    model = save_tiny_pipeline(FAMILIES[backbone][0], str(root / "model"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run = str(root / "run")
    mp = pytest.MonkeyPatch()
    mp.setenv("RMD_CACHE", str(root / "cache"))
    try:
        assert main(["distill", "--config", _recipe(str(root / "recipe.yaml"), backbone), "--model", model,
                     "--prompts", str(prompts), "--out", run, "--quiet"]) == 0
    finally:
        mp.undo()
    return backbone, model, run, str(prompts), str(root / "cache")


def test_run_trains_exports_and_writes_grids(family_run):
    backbone, model, run, _, _ = family_run
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([x["loss_generator"], x["loss_fake"]])).all() for x in lines)
    full = os.path.join(run, "export", "generator_full")
    index = json.load(open(os.path.join(full, "model_index.json")))
    assert index == json.load(open(os.path.join(model, "model_index.json")))  # a complete pipeline of the family
    cascade = json.load(open(os.path.join(full, "rmd_cascade.json")))
    assert cascade["backbone"] == backbone
    assert os.path.isfile(os.path.join(run, "samples", "step-00000003.png"))


def test_cache_rows_equal_the_pipelines_own_encoding(family_run):
    from rmd.embedding_cache import EmbeddingCache
    from rmd.families import encode_prompts, load_pipeline

    backbone, model, _, _, cache_root = family_run
    [folder] = [os.path.join(cache_root, "embeddings", d) for d in os.listdir(os.path.join(cache_root, "embeddings"))]
    cache = EmbeddingCache(folder)
    assert set(cache.prompts) == set(PROMPTS) | {""}
    pipe = load_pipeline(model, backbone)
    want = encode_prompts(pipe, backbone, ["", PROMPTS[2]])
    got = cache.encode(["", PROMPTS[2]])
    torch.testing.assert_close(got.embeds, want.embeds)
    for a, b in ((got.pooled, want.pooled), (got.mask, want.mask)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    with pytest.raises(KeyError, match="not in the embedding cache"):
        cache.encode(["a prompt nobody cached"])


def test_pipeline_matches_the_run_and_is_deterministic(family_run):
    from rmd.distill.sample_cli import sample_run
    from rmd.pipeline import RMDPipeline

    backbone, _, run, _, _ = family_run
    _, res, frames = FAMILIES[backbone]
    pipe = RMDPipeline.from_pretrained(run)
    got = pipe(PROMPTS[:2], seeds=[5, 6], output_type="pt").images
    shape = (2, 3, frames, res[-1], res[-1]) if frames else (2, 3, res[-1], res[-1])
    assert got.shape == shape and torch.isfinite(got).all()
    again = pipe(PROMPTS[1], seeds=[6], output_type="pt").images  # alone, not batched
    # batch size changes the kernels' summation order (CI saw 1.4e-5 on one pixel of Wan's video); a
    # wrong seed or a batch-coupled noise stream moves pixels by tenths, so 1e-4 still tells them apart
    torch.testing.assert_close(again[0], got[1], atol=1e-4, rtol=1e-3)
    want = sample_run(run, PROMPTS[:2], [5, 6])  # the LoRA on the shared base, text encoders live
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    pil = pipe(PROMPTS[0], seed=1).images[0]
    if frames:
        assert len(pil) == frames and pil[0].size == (res[-1], res[-1])
    else:
        assert pil.size == (res[-1], res[-1])


def _net(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def test_lora_loads_into_the_stock_pipeline(family_run):
    import diffusers

    from rmd.denoisers import from_model
    from rmd.families import FAMILIES as SPECS
    from rmd.families import encode_prompts, load_pipeline
    from rmd.lora import load_generator_lora

    backbone, model, run, _, _ = family_run
    _, res, frames = FAMILIES[backbone]
    stock = getattr(diffusers, SPECS[backbone].pipeline_class).from_pretrained(model, local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    teacher_net = _net(load_pipeline(model, backbone))
    merged_net = _net(load_pipeline(os.path.join(run, "export", "generator_full"), backbone))
    if backbone != "pixart-sigma":  # diffusers' own loader takes the file
        stock.load_lora_weights(os.path.join(run, "export", "generator_lora"))
    else:
        load_generator_lora(stock, os.path.join(run, "export", "generator_lora"))
    cond = encode_prompts(stock, backbone, PROMPTS[:2])
    g = torch.Generator().manual_seed(0)
    lat = (2, 4, (frames - 1) // 4 + 1, 4, 4) if frames else (2, 4, 4, 4)
    x, t = torch.randn(lat, generator=g), torch.tensor([0.9, 0.4])
    kw = dict(scheduler_config=dict(stock.scheduler.config))
    outs = [from_model(n, **kw)(x, t, cond)[0] for n in (_net(stock), merged_net, teacher_net)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-3)  # LoRA in the stock pipeline == merged
    assert (outs[0] - outs[2]).abs().max() > 1e-4  # and the LoRA is not a no-op
    call = dict(num_inference_steps=2, height=res[-1], width=res[-1], output_type="pt")
    if frames:
        call["num_frames"] = frames
    if backbone == "pixart-sigma":
        call["use_resolution_binning"] = False

    def sample(seed):
        out = stock(PROMPTS[0], generator=torch.Generator().manual_seed(seed), **call)
        return out.frames if frames else out.images

    a, b = sample(3), sample(3)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert a.shape[-2:] == (res[-1], res[-1])


def test_two_process_sampling_equals_one(family_run, tmp_path, monkeypatch):
    backbone, _, run, prompts, _ = family_run
    if backbone not in ("sdxl", "wan"):
        pytest.skip("one image family and the video family cover the writer paths")
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["sample", "--run", run, "--prompts", prompts, "--batch-size", "3", "--seed", "7"]
    assert main(base + ["--out", str(one)]) == 0
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(base + ["--out", str(two), "--batch-size", "1"]) == 0
    ext = ".mp4" if backbone == "wan" else ".png"
    names = sorted(n for n in os.listdir(one) if n.endswith(ext))
    assert names == [f"{i:06d}{ext}" for i in range(len(PROMPTS))] == sorted(
        n for n in os.listdir(two) if n.endswith(ext))
    for n in names:
        a, b = _pixels(one / n), _pixels(two / n)
        if ext == ".png":
            assert torch.equal(a, b)
        else:  # H.264 is lossy: a one-level float difference can move a few pixels after encoding
            diff = (a - b).abs()
            assert diff.max() <= 8 and diff.float().mean() < 0.05
        meta = json.load(open((one / n).with_suffix(".json")))
        assert meta["file"] == n and meta["prompt"] in PROMPTS


def _pixels(path):
    if str(path).endswith(".mp4"):
        import imageio.v2 as imageio

        frames = torch.tensor(np.stack(imageio.mimread(str(path))), dtype=torch.int16)
        assert frames.shape == (FAMILIES["wan"][2], 64, 64, 3)
        return frames
    from PIL import Image

    return torch.tensor(np.asarray(Image.open(path)), dtype=torch.int16)


@pytest.mark.parametrize("recipe, gamma, warmup, sample_gamma, batch", [
    ("sdxl", 0.2, 50, 1.0, 4), ("pixart-sigma", 0.2, 50, 1.0, 4), ("sd35-medium", 0.2, 50, 1.0, 4),
    ("wan21-14b", 0.5, 20, 0.9, 1), ("wan21-1.3b", 0.5, 20, 0.9, 1)])
def test_real_recipes_carry_the_papers_training_settings(recipe, gamma, warmup, sample_gamma, batch, tmp_path):
    """Paper, implementation details: gamma 0.2 / 0.5 in training, 1.0 / 0.9 at inference, warm-up 50 / 20,
    batch 32 images (8 processes x 4) / 4 videos (4 x 1), clipping 1.0; bf16 and gradient checkpointing."""
    from rmd.distill.config import load_run_config

    cfg = load_run_config(recipe, teacher=str(tmp_path / "m"), prompts="p.txt")
    m = cfg.method_config
    assert (cfg.method, m.gamma, m.warmup_iters, cfg.sampling.gamma) == ("rmd", gamma, warmup, sample_gamma)
    assert (cfg.batch_size, cfg.grad_clip, cfg.mixed_precision, cfg.gradient_checkpointing) == (batch, 1.0, "bf16", True)
    assert m.fake_updates == 1 and cfg.teacher == str(tmp_path / "m") and os.path.isabs(cfg.prompts)
