"""The shipped toy evaluator and the metrics built on it (rmd.toy.evaluator, rmd.toy.metrics).

Everything is measured on fresh renders the evaluator never trained on: training saw
128,000 layout seeds drawn at random from [0, 2^31) (1000 steps x 128), so a given
(scene, layout seed) below was in the training data with probability < 1e-4 even before
asking for the same scene too. Thresholds come from the values measured when the
evaluator was shipped (listed below), with margin.

Independent truths: the scene labels the images were rendered from; the Frechet distance
of two diagonal Gaussians, ``|mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2``, and its
invariance under a common rotation; Gaussian blur removes high frequencies.

Measured with the shipped evaluator on the renders below (N = 512, 87 of them held-out pairs):
every attribute 1.000 on fresh 32 px renders and on 256 held-out-pair renders; on 8 px
renders upsampled to 32: colour/position/background/count 1.000, shape 0.822, texture
0.279; degraded rate real 0.000, 8 px 0.002, blurred 0.000, cast 0.988, clutter 0.971,
wrong colour 0.000 (colour read as asked 0.000); fd to the reference set: real 6.9, other
scenes 60, blurred 412, clutter 670, cast 1220, 8 px 1750; detail: real 1.007, blurred
(sigma 0.7 px) 0.094, 8 px 0.0069.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from rmd.toy import world
from rmd.toy.evaluator import (EVALUATOR_DIR, EvaluatorConfig, count_parameters, gaussian_blur, load_evaluator,
                               train_evaluator)
from rmd.toy.metrics import (attribute_accuracy, degraded_rate, detail_score, feature_fd, frechet_distance,
                             high_frequency_energy)
from rmd.upsample import upsample

N = 512
SEED_BASE = 7_000_000


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


@pytest.fixture(scope="module")
def renders():
    """N fresh scenes over all pairs: reference renders, an independent second set, and variants of it."""
    scenes = world.sample_scenes(N, 4242, "all")
    ref_seeds = [SEED_BASE + i for i in range(N)]
    seeds = [SEED_BASE + N + i for i in range(N)]
    return {
        "scenes": scenes,
        "reference": world.render(scenes, 32, ref_seeds),
        "real": world.render(scenes, 32, seeds),
        "cast": world.render(scenes, 32, seeds, ["cast"] * N),
        "clutter": world.render(scenes, 32, seeds, ["clutter"] * N),
        "low8": upsample(world.render(scenes, 8, seeds), (32, 32)),
        "blur": gaussian_blur(world.render(scenes, 32, seeds), torch.full((N,), 0.7)),
    }


def test_shipped_evaluator_loads_offline_and_is_small(evaluator):
    assert not evaluator.training
    assert count_parameters(evaluator) < 1_000_000
    total = sum(os.path.getsize(os.path.join(EVALUATOR_DIR, f)) for f in os.listdir(EVALUATOR_DIR))
    assert total < 2 * 2**20, f"shipped evaluator folder is {total} bytes"
    with open(os.path.join(EVALUATOR_DIR, "training_record.json")) as f:
        record = json.load(f)
    assert record["curve"][-1]["step"] == record["steps"] == record["config"]["steps"]
    assert record["wall_seconds"] > 0 and record["command"]
    assert record["curve"][-1]["loss"] < record["curve"][0]["loss"]
    out = evaluator(torch.zeros(2, 3, 32, 32))
    assert out["features"].shape == (2, evaluator.config.feature_dim) and out["degraded"].shape == (2,)
    # other sizes are resized to 32 first, and the reading does not depend on the batch split
    r = evaluator.read(torch.zeros(3, 3, 64, 64), batch_size=2)
    assert r.features.shape == (3, evaluator.config.feature_dim)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        evaluator.read(torch.zeros(2, 1, 32, 32))


def test_attributes_read_back_from_fresh_renders(evaluator, renders):
    # measured 1.000 for every attribute here; training_record.json: 0.995 shape, >= 0.999 others on 1024
    acc = attribute_accuracy(evaluator.read(renders["real"]), renders["scenes"])
    for name, value in acc["per_attribute"].items():
        assert value >= 0.97, (name, acc["per_attribute"])
    assert acc["alignment"] >= 0.99
    assert acc["num_heldout"] > 50 and acc["alignment_heldout"] >= 0.98


def test_attributes_of_held_out_pairs(evaluator):
    scenes = world.sample_scenes(256, 77, "heldout")
    images = world.render(scenes, 32, [SEED_BASE + 5000 + i for i in range(256)])
    acc = attribute_accuracy(evaluator.read(images), scenes)
    assert acc["num_heldout"] == 256
    assert min(acc["per_attribute"].values()) >= 0.97, acc["per_attribute"]


def test_low_resolution_renders_keep_coarse_attributes_but_not_texture(evaluator, renders):
    acc = attribute_accuracy(evaluator.read(renders["low8"]), renders["scenes"])["per_attribute"]
    for name in ("colour", "position", "background", "count"):
        assert acc[name] >= 0.97, (name, acc)
    assert acc["texture"] < 0.5  # the 4 px texture is not in an 8 px image: near chance (0.25 + plain share)


def test_degraded_head(evaluator, renders):
    assert degraded_rate(evaluator.read(renders["real"])) <= 0.02
    assert degraded_rate(evaluator.read(renders["low8"])) <= 0.05  # low resolution is not a degradation
    assert degraded_rate(evaluator.read(renders["blur"])) <= 0.05
    assert degraded_rate(evaluator.read(renders["cast"])) >= 0.9
    assert degraded_rate(evaluator.read(renders["clutter"])) >= 0.9
    # the head is not fooled by an image of the wrong colour, which is a clean image
    wrong = world.render(renders["scenes"], 32, [SEED_BASE + 9000 + i for i in range(N)], ["wrong_colour"] * N)
    assert degraded_rate(evaluator.read(wrong)) <= 0.05
    assert attribute_accuracy(evaluator.read(wrong), renders["scenes"])["per_attribute"]["colour"] <= 0.05


def test_frechet_distance_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 9.0, 0.25])
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 3) ** 2 + 0.0
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # a common rotation of both Gaussians changes nothing
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)
    # singular covariances (a dead feature) are fine
    singular = frechet_distance(mu1, np.diag([1.0, 0.0, 1.0]), mu1, np.diag([4.0, 0.0, 1.0]))
    assert singular == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, np.diag(s1), mu2[:2], np.diag(s2[:2]))


def test_feature_fd_matches_sample_statistics():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal([3.0, 0.0], [1.0, 2.0], size=(20000, 2))
    # exact value for the generating Gaussians: 9 + (1 - 1)^2 + (1 - 2)^2 = 10
    assert feature_fd(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(10.0, rel=0.05)


def test_fd_real_vs_real_is_small_and_degradations_are_large(evaluator, renders):
    ref = evaluator.read(renders["reference"]).features
    fd = {k: feature_fd(evaluator.read(renders[k]).features, ref) for k in ("real", "cast", "clutter", "low8", "blur")}
    # a different draw of scenes from the same distribution: real vs real is matched scene by scene
    other = world.render(world.sample_scenes(N, 999, "all"), 32, [SEED_BASE + 3000 + i for i in range(N)])
    fd["other_scenes"] = feature_fd(evaluator.read(other).features, ref)
    assert fd["real"] < 20, fd
    for k in ("cast", "clutter", "low8", "blur"):
        assert fd[k] > 10 * fd["real"], fd
    assert fd["other_scenes"] > 2 * fd["real"], fd


def test_detail_score(renders):
    real = detail_score(renders["real"], renders["reference"])
    assert 0.9 < real < 1.1
    assert detail_score(renders["blur"], renders["reference"]) < 0.5
    assert detail_score(renders["low8"], renders["reference"]) < 0.05
    noisy = renders["real"] + 0.05 * torch.randn(renders["real"].shape, generator=torch.Generator().manual_seed(0))
    assert detail_score(noisy, renders["reference"]) > 1.1  # noise is not missing detail
    # an 8 px input is measured after bilinear resizing to 32 px, the cascade's own upsampling
    small = world.render(renders["scenes"][:8], 8, list(range(8)))
    assert torch.allclose(high_frequency_energy(small), high_frequency_energy(upsample(small, (32, 32))))
    assert math.isfinite(real)


def test_training_is_reproducible_from_the_seed(tmp_path):
    # a 2-step run of the real entry point (not the shipped model): same seed, same weights
    cfg = EvaluatorConfig(steps=2, batch_size=8, val_images=8, log_every=1)
    states = []
    for name in ("a", "b"):
        record = train_evaluator(cfg, str(tmp_path / name), progress=False, command="test")
        assert record["steps"] == 2 and len(record["curve"]) == 2 and "validation" in record
        states.append(load_evaluator(str(tmp_path / name)).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    train_evaluator(cfg.model_copy(update={"seed": 1}), str(tmp_path / "c"), progress=False)
    assert not torch.equal(load_evaluator(str(tmp_path / "c")).state_dict()["degraded.weight"],
                           states[0]["degraded.weight"])
    with pytest.raises(FileNotFoundError, match="python -m rmd.toy.evaluator"):
        load_evaluator(str(tmp_path / "missing"))


def test_alignment_standard_error_is_over_images():
    # four scenes; the readings get 6/6, 6/6, 3/6 and 0/6 attributes right: per-image alignment
    # (1, 1, .5, 0), mean .625, sample std sqrt(((.375^2)*2 + .125^2 + .625^2) / 3), s.e. = std / 2
    scenes = world.sample_scenes(4, seed=3)
    truth = {name: torch.tensor([s.labels()[name] for s in scenes]) for name in world.ATTRIBUTES}
    wrong = {name: (v + 1) % len(world.ATTRIBUTES[name]) for name, v in truth.items()}
    labels = {}
    for j, name in enumerate(world.ATTRIBUTES):
        labels[name] = torch.stack([truth[name][0], truth[name][1], truth[name][2] if j < 3 else wrong[name][2],
                                    wrong[name][3]])
    from rmd.toy.evaluator import Readout

    acc = attribute_accuracy(Readout(labels, torch.zeros(4), torch.zeros(4, 2)), scenes)
    assert acc["alignment"] == pytest.approx(0.625)
    std = math.sqrt((2 * 0.375**2 + 0.125**2 + 0.625**2) / 3)
    assert acc["alignment_se"] == pytest.approx(std / 2, rel=1e-6)


def test_paired_fd_bootstrap_separates_a_real_shift_and_cancels_shared_noise():
    from rmd.toy.metrics import feature_fd, paired_fd_bootstrap

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 4, generator=g)
    same = ref + 0.3 * torch.randn(300, 4, generator=g)  # image-by-image close to the reference
    shifted = same + torch.tensor([0.6, 0.0, 0.0, 0.0])  # the same images, mean moved: FD + 0.36
    out = paired_fd_bootstrap({"a": same, "b": shifted, "a2": same.clone()}, ref, rounds=100, seed=1)
    d = out["b"]["fd_diff"]["a"]
    assert d["diff"] == pytest.approx(feature_fd(shifted, ref) - feature_fd(same, ref))
    assert d["diff"] > 0.25 and d["diff"] > 4 * d["se"]  # a real difference, well outside the spread
    assert d["se"] < out["b"]["fd_se"]  # pairing removes the prompts' shared variation
    assert out["a"]["fd_diff"]["a2"] == {"diff": 0.0, "se": 0.0}  # identical sets never differ
    assert out["a"]["fd_diff"]["b"]["diff"] == pytest.approx(-d["diff"])
    assert paired_fd_bootstrap({"a": same, "b": shifted}, ref, rounds=100, seed=1)["b"] == \
        {"fd_se": out["b"]["fd_se"], "fd_diff": {"a": d}}  # reproducible from its seed
    with pytest.raises(ValueError, match="one row per reference"):
        paired_fd_bootstrap({"a": same[:10]}, ref)


def test_toy_eval_fd_bootstrap_adds_the_spread_to_the_json_rows(capsys):
    from rmd.cli import main

    assert main(["toy", "eval", "--rows", "real,real-blur", "--num-images", "24", "--fd-bootstrap", "20",
                 "--json"]) in (0, None)
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["real-blur"]["fd_diff"]["real"]["diff"] == pytest.approx(rows["real-blur"]["fd"] - rows["real"]["fd"])
    assert rows["real"]["fd_se"] > 0 and rows["real-blur"]["fd_diff"]["real"]["se"] > 0
