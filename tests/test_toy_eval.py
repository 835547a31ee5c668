"""`rmd toy eval` and the Python API behind it (rmd.toy.evaluate), end to end.

The teacher is a tiny *untrained* SD3 transformer built and saved here (the shipped one
may not exist yet, and the test must not depend on it); its samples are noise, which is
what the metrics must then say. The shipped evaluator is used as is.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
from PIL import Image

from rmd.cli import main
from rmd.toy import world
from rmd.toy.evaluate import Row, evaluate_rows, make_eval_set, real_generator, teacher_generator
from rmd.toy.evaluator import load_evaluator
from rmd.toy.teacher import TeacherConfig, build_transformer, load_teacher, save_teacher
from rmd.toy.text import ToyTextEncoder, ToyTokenizer, build_resampler, build_text_encoder

FIELDS = {"name": str, "alignment": float, "fd": float, "detail": float, "degraded_rate": float,
          "seconds_per_image": float, "alignment_heldout": (float, type(None)), "per_attribute": dict,
          "num_images": int, "num_heldout": int}
NUM_IMAGES = 24


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    cfg = TeacherConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_width=16, text_layers=1,
                        guidance_scale=2.0)
    tok = ToyTokenizer(world.vocabulary())
    path = str(tmp_path_factory.mktemp("tiny_teacher"))
    save_teacher(path, build_transformer(cfg), ToyTextEncoder(tok, build_text_encoder(tok, 16, 1), build_resampler(cfg.context_tokens, 16)),
                 cfg)
    return path


@pytest.fixture(scope="module")
def json_rows(teacher_dir, tmp_path_factory):
    cwd = os.getcwd()
    work = tmp_path_factory.mktemp("cwd")
    os.chdir(work)  # to see that nothing is written unless asked
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["toy", "eval", "--num-images", str(NUM_IMAGES), "--steps", "2", "--teacher", teacher_dir,
                       "--json"])
        assert os.listdir(work) == []
    finally:
        os.chdir(cwd)
    assert rc == 0
    return json.loads(out.getvalue())


def test_json_contract(json_rows):
    assert [r["name"] for r in json_rows] == ["real", "teacher", "teacher-low"]
    for r in json_rows:
        for key, kind in FIELDS.items():
            assert isinstance(r[key], kind), (r["name"], key, r[key])
        assert isinstance(r["nfe"], (int, float))
        assert 0.0 <= r["alignment"] <= 1.0 and 0.0 <= r["degraded_rate"] <= 1.0
        assert r["fd"] >= 0.0 and r["detail"] >= 0.0 and r["seconds_per_image"] > 0.0
        assert r["num_images"] == NUM_IMAGES
        assert set(r["per_attribute"]) == set(world.ATTRIBUTES)
    nfe = {r["name"]: r["nfe"] for r in json_rows}
    assert nfe == {"real": 0, "teacher": 4, "teacher-low": 4}  # 2 steps x (cond + uncond)


def test_real_row_is_the_floor(json_rows):
    real, teacher, low = json_rows
    assert real["alignment"] >= 0.95
    assert 0.85 < real["detail"] < 1.15
    assert real["degraded_rate"] <= 0.05
    # an untrained teacher draws noise: far from the real renders, and not aligned
    assert real["fd"] < 0.1 * teacher["fd"] and real["fd"] < 0.1 * low["fd"]
    assert teacher["alignment"] < 0.6
    assert teacher["detail"] > 3 and low["detail"] < teacher["detail"]  # 32 px noise vs upsampled 8 px noise


def test_table_grid_and_guidance_one(teacher_dir, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["toy", "eval", "--num-images", "4", "--steps", "1", "--guidance", "1", "--rows", "teacher,real",
                 "--teacher", teacher_dir, "--grid", str(grid)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["name", "align", "held"]
    assert lines[1].split()[0] == "teacher" and lines[2].split()[0] == "real"
    assert lines[1].split()[-2] == "1"  # nfe: no uncond pass at guidance 1
    with Image.open(grid) as im:
        assert im.size[1] == 2 * (64 + 2) and im.size[0] > 4 * 64


@pytest.mark.parametrize("argv, message", [
    (["--rows", "real,student"], "unknown row"),
    (["--num-images", "1"], "at least 2"),
    (["--teacher", "/nonexistent/teacher"], "lacks"),
])
def test_user_errors_exit_2(argv, message, capsys):
    assert main(["toy", "eval", "--num-images", "4", "--steps", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_evaluate_rows_api(teacher_dir):
    eval_set = make_eval_set(16, seed=5)
    again = make_eval_set(16, seed=5)
    assert eval_set.prompts == again.prompts and eval_set.seeds == again.seeds
    assert torch.equal(eval_set.reference, again.reference)
    assert len(set(eval_set.seeds) | set(eval_set.reference_seeds) | set(eval_set.real_seeds)) == 3 * 16
    smaller = make_eval_set(6, seed=5)  # image i does not depend on the number of images
    assert smaller.prompts == eval_set.prompts[:6] and smaller.seeds == eval_set.seeds[:6]
    assert torch.equal(smaller.reference, eval_set.reference[:6])
    evaluator = load_evaluator()

    def low_res_renders(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return world.render(eval_set.scenes, 8, eval_set.real_seeds)  # 8 px: resized to 32 by the evaluation

    teacher = load_teacher(teacher_dir)
    gen, nfe = teacher_generator(teacher, steps=2, guidance=3.0)
    rows = [Row("real", real_generator(eval_set), 0), Row("render8", low_res_renders),
            Row("t", gen, nfe), Row("t2", gen, nfe)]
    results, images = evaluate_rows(rows, evaluator=evaluator, eval_set=eval_set, return_images=True)
    by_name = {r["name"]: r for r in results}
    assert images["render8"].shape == (16, 3, 32, 32)
    assert by_name["render8"]["nfe"] is None and nfe == 4
    assert by_name["render8"]["detail"] < 0.1 < by_name["real"]["detail"]  # no fine texture at 8 px
    assert torch.equal(images["t"], images["t2"])  # per-image seeds: sampling is reproducible
    assert images["t"].abs().max() <= 1.0  # clamped like a saved image

    with pytest.raises(ValueError, match=r"must return \(16, 3, H, W\)"):
        evaluate_rows([Row("bad", lambda p, s: torch.zeros(15, 3, 32, 32))], evaluator=evaluator, eval_set=eval_set)


def test_perturbed_real_rows_sit_between_the_floor_and_a_visible_change():
    """real-blur / real-noise: attributes still read, FD above the real floor, far below a 1 px blur."""
    from rmd.toy.evaluate import standard_rows
    from rmd.toy.evaluator import gaussian_blur

    eval_set = make_eval_set(64, seed=3)
    evaluator = load_evaluator()
    real = real_generator(eval_set)
    rows = standard_rows(["real", "real-blur", "real-noise"], eval_set) + [
        Row("blur1", lambda p, s: gaussian_blur(real(p, s), torch.full((len(p),), 1.0)))]
    by = {r["name"]: r for r in evaluate_rows(rows, evaluator=evaluator, eval_set=eval_set)}
    for name in ("real-blur", "real-noise"):
        assert by[name]["alignment"] > 0.97, name
        assert by["real"]["fd"] < by[name]["fd"] < by["blur1"]["fd"] / 3, (name, by[name]["fd"], by["blur1"]["fd"])
    assert by["real-blur"]["detail"] < 0.7 < by["real"]["detail"] < by["real-noise"]["detail"]
    # reproducible: each image's noise comes from its own seed
    noisy = standard_rows(["real-noise"], eval_set)[0].generate
    assert torch.equal(noisy(eval_set.prompts, eval_set.seeds)[5], noisy(eval_set.prompts, eval_set.seeds)[5])
