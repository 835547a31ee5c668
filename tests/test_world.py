"""rmd.toy.world and rmd.toy.text: the renderer, the prompts, the splits and the tokenizer.

Independent truths used here: average pooling (a 32 px render pooled 4x must be the 8 px
render of the same continuous image), the Laplacian's high-frequency energy (the texture
must add it at 32 px and not at 16 or 8 px), and hand-written word lists for what each
attribute value must be called in a prompt.

Measured when written (4 px texture): resolution consistency error <= 7e-6 (float32 rounding;
tolerance 1e-4); over all colours and backgrounds, the texture's Laplacian energy (upsampled to
32) is <= 3.2% of its 32 px energy at 16 px (what remains comes from the object's edges) and
<= 0.9% at 8 px (threshold 5%); at 32 px it is >= 0.047 (threshold 0.03).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from rmd.toy import world
from rmd.toy.text import ToyTokenizer
from rmd.upsample import upsample

SCENE = world.Scene("square", "red", "striped", "center", "gray", 1)

# What a prompt must say for each value (written from the attribute names, not from world's tables).
TEXTURE_WORDS = {"plain": ("plain", "solid", "no pattern"), "striped": ("striped", "stripes"),
                 "checkered": ("checkered", "checker", "checks"), "dotted": ("dotted", "spotted", "dots")}
POSITION_WORDS = {"left": ("left",), "right": ("right",), "top": ("top",), "bottom": ("bottom",),
                  "center": ("center", "middle")}


def laplacian_energy(img: torch.Tensor) -> float:
    """Mean squared response of the 4-neighbour Laplacian over the interior of a (3, H, W) image."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None].repeat(3, 1, 1, 1)
    return F.conv2d(img[None], k, groups=3).pow(2).mean().item()


def test_render_is_deterministic_and_batch_independent():
    a = world.render_one(SCENE, 32, seed=11)
    assert torch.equal(a, world.render_one(SCENE, 32, seed=11))
    assert not torch.equal(a, world.render_one(SCENE, 32, seed=12))  # the layout seed jitters the object
    scenes = world.sample_scenes(5, 3, "all")
    batch = world.render(scenes, 16, [1, 2, 3, 4, 5])
    assert batch.shape == (5, 3, 16, 16) and batch.dtype == torch.float32
    assert torch.equal(batch[2], world.render_one(scenes[2], 16, 3))
    assert batch.min() >= -1.0 and batch.max() <= 1.0


@pytest.mark.parametrize("degradation", [None, *world.DEGRADATIONS])
def test_resolutions_are_area_averages_of_one_image(degradation):
    scenes = world.sample_scenes(12, 5, "all")
    worst = 0.0
    for i, scene in enumerate(scenes):
        full = world.render_one(scene, 32, i, degradation)
        for size in (8, 16):
            low = world.render_one(scene, size, i, degradation)
            worst = max(worst, (F.avg_pool2d(full[None], 32 // size)[0] - low).abs().max().item())
    assert worst < 1e-4, f"low-resolution render differs from the pooled 32 px render by {worst}"


def test_texture_detail_present_at_32_and_gone_at_16_and_8():
    for texture, colour, background in itertools.product(("striped", "checkered", "dotted"), world.COLOURS,
                                                         world.BACKGROUNDS):
        textured = world.Scene("square", colour, texture, "center", background, 1)
        plain = world.Scene("square", colour, "plain", "center", background, 1)

        def texture_energy(size: int) -> float:
            up = [upsample(world.render_one(s, size, 3)[None], (32, 32))[0] for s in (textured, plain)]
            return laplacian_energy(up[0]) - laplacian_energy(up[1])

        at32, at16, at8 = texture_energy(32), texture_energy(16), texture_energy(8)
        assert at32 > 0.03, (texture, colour, background, at32)
        assert abs(at16) < 0.05 * at32, (texture, colour, background, at16, at32)
        assert abs(at8) < 0.05 * at32, (texture, colour, background, at8, at32)


def test_texture_is_a_flat_tone_inside_the_object_at_16_px():
    # each 16-px pixel covers one mirror half of a 4-px cell, so the pattern averages out
    # exactly: the interior of a textured square is one flat colour at 16 px, not at 32 px
    for texture in ("striped", "checkered", "dotted"):
        scene = world.Scene("square", "red", texture, "center", "black", 1)
        at16 = world.render_one(scene, 16, 3)[:, 6:10, 6:10]
        at32 = world.render_one(scene, 32, 3)[:, 12:20, 12:20]
        assert at16.flatten(1).std(1).max() < 1e-3, texture
        assert at32.flatten(1).std(1).max() > 0.3, texture


def test_prompts_mention_every_attribute():
    for scene in world.all_scenes()[::7]:
        for variant in range(6):
            words = world.prompt_for(scene, variant).split()
            text = " ".join(words)
            assert scene.colour in words and scene.background in words
            assert ({"cross": "crosses"}.get(scene.shape, scene.shape + "s") if scene.count == 2 else scene.shape) in words
            assert ("two" in words) == (scene.count == 2)
            assert any(w in text for w in TEXTURE_WORDS[scene.texture]), text
            assert not any(w in text for t, ws in TEXTURE_WORDS.items() if t != scene.texture for w in ws), text
            assert any(w in words for w in POSITION_WORDS[scene.position]), text
            assert not any(w in words for p, ws in POSITION_WORDS.items() if p != scene.position for w in ws), text


def test_splits_keep_held_out_pairs_out_of_training():
    train = world.sample_scenes(5000, 0, "train")
    assert not any((s.shape, s.colour) in world.HELD_OUT_PAIRS for s in train)
    held = world.sample_scenes(500, 0, "heldout")
    assert all(s.held_out for s in held) and {(s.shape, s.colour) for s in held} == set(world.HELD_OUT_PAIRS)
    mixed = world.sample_scenes(2000, 0, "all")
    assert 0.1 < sum(s.held_out for s in mixed) / len(mixed) < 0.25  # 4 of 24 pairs = 0.167
    assert world.sample_scenes(50, 9, "all") == world.sample_scenes(50, 9, "all")
    assert len(world.all_scenes()) == 4 * 6 * 4 * 5 * 3 * 2
    batch = world.training_batch(64, 8, seed=1)
    assert not any(s.held_out for s in batch.scenes)


@pytest.mark.parametrize("degradation", world.DEGRADATIONS)
def test_degradations_change_the_image(degradation):
    diffs = [(world.render_one(s, 32, i, degradation) - world.render_one(s, 32, i)).abs().mean().item()
             for i, s in enumerate(world.sample_scenes(10, 2, "all"))]
    assert min(diffs) > 0.01, diffs


def test_wrong_colour_keeps_layout_and_changes_object_colour():
    clean = world.render_one(SCENE, 32, 4)
    wrong = world.render_one(SCENE, 32, 4, "wrong_colour")
    background = (clean - wrong).abs().sum(0) == 0
    assert background.float().mean() > 0.5  # the background is untouched
    assert (clean - wrong).abs().max() > 0.3  # the object is not red any more


def test_bad_values_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        world.Scene("hexagon", "red", "plain", "left", "black", 1)
    with pytest.raises(ValueError, match="unknown count 3"):
        world.Scene("circle", "red", "plain", "left", "black", 3)
    with pytest.raises(ValueError, match="unknown colour"):
        world.Scene("circle", "purple", "plain", "left", "black", 1)
    with pytest.raises(ValueError, match="unknown degradation"):
        world.render_one(SCENE, 32, degradation="blur")
    with pytest.raises(ValueError, match="split must be"):
        world.sample_scenes(3, 0, "test")
    with pytest.raises(ValueError, match="one seed per scene"):
        world.render([SCENE, SCENE], 8, [1])


def test_tokenizer_round_trips_the_vocabulary_and_rejects_long_prompts():
    vocab = world.vocabulary()
    tok = ToyTokenizer(vocab)
    ids, mask = tok(vocab)
    for i, word in enumerate(vocab):
        n = int(mask[i].sum())
        assert n == 3 and ids[i, 0] == tok.bos_id and ids[i, 2] == tok.eos_id
        assert tok.tokens[ids[i, 1]] == word
    assert len(set(ids[:, 1].tolist())) == len(vocab)  # no two words share an id, none is <unk>
    # every prompt the world can write is in the vocabulary and fits
    for scene in world.all_scenes()[::11]:
        for variant in range(5):
            prompt = world.prompt_for(scene, variant)
            assert tok.unknown_words(prompt) == []
            tok([prompt])
    with pytest.raises(ValueError, match="at most 22"):
        tok([" ".join(["red"] * 23)])
    tok([" ".join(["red"] * 22)])  # exactly the limit is fine
