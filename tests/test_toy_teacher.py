"""The shipped toy teacher: loads offline, has its training record, and samples through the real SD3 path."""

import json
import os

import torch

from rmd.denoisers import CFGDenoiser, SD3Denoiser
from rmd.plan import make_plan
from rmd.sampler import sample
from rmd.toy.teacher import TEACHER_DIR, TeacherConfig, flow_matching_loss, load_teacher
from rmd.toy.world import training_batch


def test_shipped_teacher_loads_offline_and_has_its_record(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = load_teacher()
    assert teacher.transformer.__class__.__name__ == "SD3Transformer2DModel"
    assert isinstance(teacher.denoiser(), SD3Denoiser)
    with open(os.path.join(TEACHER_DIR, "training_record.json")) as f:
        record = json.load(f)
    assert record["command"].startswith("rmd toy train-teacher") or "train-teacher" in record["command"]
    assert record["wall_seconds"] > 0 and len(record["loss_curve"]) >= 10
    # the shipped folder stays small enough to ship (issue limit: 20 MiB with everything else)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.dirname(TEACHER_DIR)) for f in fs)
    assert total < 20 * 2**20


def test_shipped_teacher_denoises_far_better_than_chance():
    """Velocity MSE on fresh renders is well below the zero-prediction baseline at every noise level."""
    teacher = load_teacher()
    batch = training_batch(16, teacher.config.target_resolution, seed=12345)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = teacher.text.encode(batch.prompts)
        for t in (0.2, 0.5, 0.8):
            eps = torch.randn(batch.images.shape, generator=g)
            xt = (1 - t) * batch.images + t * eps
            v = teacher.transformer(hidden_states=xt, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                                    timestep=torch.full((16,), 1000 * t)).sample
            trained = flow_matching_loss(v, batch.images, eps).mean()
            baseline = flow_matching_loss(torch.zeros_like(v), batch.images, eps).mean()
            assert trained < 0.35 * baseline, (t, float(trained), float(baseline))


def test_shipped_teacher_runs_a_cascade_at_its_stage_resolutions():
    teacher = load_teacher()
    cfg: TeacherConfig = teacher.config
    with torch.no_grad():
        cond = teacher.text.encode(["a red striped circle on the left on a black background"] * 2)
        model = CFGDenoiser(teacher.denoiser(), teacher.text.encode([""]), cfg.guidance_scale)
        out = sample(model, make_plan(4, "8,16,32", [-2.5, 0.0]), cond, seeds=[0, 1], eta=1.0, gamma=1.0)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_a_later_phase_carries_word_vectors_across_a_vocabulary_change():
    # a world that renamed one word: shared words keep their trained rows (looked up by word,
    # not by index), the new word keeps its fresh vector, and everything else is copied as is
    from rmd.toy.teacher import _carry_word_vectors
    from rmd.toy.text import ToyTextEncoder, ToyTokenizer, build_text_encoder

    old_tok = ToyTokenizer(["a", "red", "square", "diamond"])
    new_tok = ToyTokenizer(["a", "cross", "red", "square"])
    old = build_text_encoder(old_tok, width=16, layers=1, seed=1)
    fresh = build_text_encoder(new_tok, width=16, layers=1, seed=2)
    state = _carry_word_vectors(ToyTextEncoder(old_tok, old), new_tok, fresh)
    key = "text_model.embeddings.token_embedding.weight"
    table, old_table = state[key], old.state_dict()[key]
    for word in ("a", "red", "square", "<eos>", "<pad>"):
        assert torch.equal(table[new_tok.index[word]], old_table[old_tok.index[word]]), word
    assert torch.equal(table[new_tok.index["cross"]], fresh.state_dict()[key][new_tok.index["cross"]])
    assert new_tok.index["square"] != old_tok.index["square"]  # the test would be vacuous otherwise
    layer = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(state[layer], old.state_dict()[layer])
    fresh.load_state_dict(state)  # the result fits the new encoder
