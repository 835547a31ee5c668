"""RMDPipeline: loads a finished run (its merged export), samples exactly what the run's own
sampler gives, survives save_pretrained / from_pretrained, and refuses what it cannot load."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from rmd.cli import UserError
from rmd.distill.train import train
from rmd.pipeline import CASCADE_FILE, RMDPipeline

from helpers import small

PROMPTS = ["a red circle on the left on a black background", "two blue squares at the top , white background"]


@pytest.fixture(scope="module")
def run(teacher_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(small("toy-rmd", teacher_dir, max_steps=2, method_config={"warmup_iters": 0}), out, progress=False)
    return out


def test_pipeline_equals_the_runs_sampler(run):
    from rmd.distill.sample_cli import sample_run

    pipe = RMDPipeline.from_pretrained(run)
    got = pipe(PROMPTS, seeds=[3, 4], output_type="pt").images
    want = sample_run(run, PROMPTS, [3, 4])  # LoRA on the shared base, not merged
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert got.shape == (2, 3, 32, 32)
    assert pipe.plan.num_steps == 4 and [s.size[0] for s in pipe.plan.stages] == [16, 32]


def test_images_do_not_depend_on_batching(run):
    pipe = RMDPipeline.from_pretrained(run)
    both = pipe(PROMPTS, seed=10, output_type="pt").images
    second = pipe(PROMPTS[1], seed=11, output_type="pt").images
    torch.testing.assert_close(both[1:], second)
    two = pipe(PROMPTS[0], num_images_per_prompt=2, seed=5, output_type="pt").images
    assert not torch.equal(two[0], two[1])  # different seeds, different images
    pil = pipe(PROMPTS[0]).images
    assert len(pil) == 1 and pil[0].size == (32, 32)


def test_save_and_reload(run, tmp_path):
    pipe = RMDPipeline.from_pretrained(run)
    dst = str(tmp_path / "pipe")
    pipe.save_pretrained(dst)
    assert os.path.isfile(os.path.join(dst, CASCADE_FILE))
    again = RMDPipeline.from_pretrained(dst).to("cpu")
    torch.testing.assert_close(again(PROMPTS, seed=1, output_type="pt").images,
                               pipe(PROMPTS, seed=1, output_type="pt").images)


def test_save_never_deletes_what_it_should_not(run, tmp_path):
    pipe = RMDPipeline.from_pretrained(run)
    with pytest.raises(UserError, match="loaded from"):
        pipe.save_pretrained(run)  # the run folder holds the pipeline's own folder
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        pipe.save_pretrained(str(busy))
    assert (busy / "keep.txt").exists()
    pipe.save_pretrained(str(busy), overwrite=True)
    assert (busy / CASCADE_FILE).exists() and not (busy / "keep.txt").exists()


def test_refusals(run, tmp_path):
    with pytest.raises(UserError, match="neither a pipeline folder"):
        RMDPipeline.from_pretrained(str(tmp_path))
    pipe = RMDPipeline.from_pretrained(run)
    with pytest.raises(ValueError, match="one seed per image"):
        pipe(PROMPTS, seeds=[1])
