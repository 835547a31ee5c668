"""The shipped toy teacher: loads offline, has its training record, and samples through the real SD3 path."""

import json
import os

import pytest
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


def test_shipped_teacher_feeds_its_compressed_context_whatever_the_prompt_length():
    # the speed bound of the toy's cascades rests on this: a call carries context_tokens text
    # tokens, not one per word (rmd.toy.text docstring)
    teacher = load_teacher()
    k = teacher.config.context_tokens
    assert k is not None and teacher.text.resampler is not None and teacher.text.resampler.num_tokens == k
    cond = teacher.text.encode(["a red circle", "two cyan dotted squares at the top on a gray background"])
    assert cond.embeds.shape[1] == k < len("two cyan dotted squares at the top on a gray background".split())
    assert bool(cond.mask.all())


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


def test_the_context_resampler_ignores_padding_and_round_trips(tmp_path):
    from rmd.toy.text import ContextResampler, ToyTextEncoder, ToyTokenizer, build_resampler, build_text_encoder

    net = build_resampler(3, 16, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 9, 16, generator=g)
    mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    with torch.no_grad():
        out = net(states, mask)
        # what sits in the padded positions must not matter: only the prompt's words do
        scrambled = states.clone()
        scrambled[0, 5:] = 100 * torch.randn(4, 16, generator=g)
        assert torch.allclose(net(scrambled, mask), out, atol=1e-6)
        # and unmasking the padding does change it, so the check above can fail
        assert not torch.allclose(net(scrambled, torch.ones_like(mask)), out, atol=1e-3)
    assert out.shape == (2, 3, 16)
    net.save(str(tmp_path / "r"))
    again = ContextResampler.load(str(tmp_path / "r")).eval()
    with torch.no_grad():
        assert torch.equal(again(states, mask), out)
    # through the text encoder: K context tokens, all of them attended to
    tok = ToyTokenizer(["a", "red", "square"])
    text = ToyTextEncoder(tok, build_text_encoder(tok, width=16, layers=1), net)
    cond = text.encode(["a red square", ""])
    assert cond.embeds.shape == (2, 3, 16) and cond.mask.eq(1).all() and cond.pooled.shape == (2, 16)


def test_a_phase_can_add_the_resampler_to_a_per_word_teacher(tmp_path):
    """--init-from a teacher that fed one token per word: the transformer and the words carry over,
    the resampler starts fresh, and the result loads with its compressed context."""
    from helpers import TINY

    from rmd.toy.teacher import build_transformer, save_teacher, train_teacher
    from rmd.toy.text import ToyTextEncoder, ToyTokenizer, build_text_encoder
    from rmd.toy.world import vocabulary

    old_cfg = TeacherConfig(**TINY, context_tokens=None)
    tok = ToyTokenizer(vocabulary())
    old_dir = str(tmp_path / "old")
    save_teacher(old_dir, build_transformer(old_cfg), ToyTextEncoder(tok, build_text_encoder(tok, 16, 1, seed=3)), old_cfg)
    with open(os.path.join(old_dir, "training_record.json"), "w") as f:
        json.dump({"command": "rmd toy train-teacher", "loss_curve": []}, f)
    # a folder written before the option existed has no context_tokens key: it means one token per word
    with open(os.path.join(old_dir, "toy_config.json")) as f:
        data = json.load(f)
    del data["context_tokens"]
    with open(os.path.join(old_dir, "toy_config.json"), "w") as f:
        json.dump(data, f)
    assert load_teacher(old_dir).text.resampler is None

    cfg = TeacherConfig(**TINY, context_tokens=2, steps=2, batch_size=2, warmup=1, resolutions=(8, 16),
                        resolution_weights=(0.5, 0.5), target_resolution=16)
    new_dir = str(tmp_path / "new")
    with pytest.raises(ValueError, match="architecture differs"):
        train_teacher(cfg, new_dir, progress=False, init_from=old_dir)  # 16 px target vs 32: refused
    cfg = TeacherConfig(**TINY, context_tokens=2, steps=2, batch_size=2, warmup=1)
    record = train_teacher(cfg, new_dir, progress=False, init_from=old_dir)
    assert record["init_from"]["command"] == "rmd toy train-teacher"
    new = load_teacher(new_dir)
    assert new.text.resampler is not None and new.config.context_tokens == 2
    assert new.text.encode(["a red square on the left on a black background"]).embeds.shape == (1, 2, 16)
    # and back again is refused with the fix named
    with pytest.raises(ValueError, match="context_tokens"):
        train_teacher(old_cfg.model_copy(update={"steps": 1, "batch_size": 2}), str(tmp_path / "x"), progress=False,
                      init_from=new_dir)


def test_a_folder_whose_config_and_resampler_disagree_is_refused(tmp_path):
    from helpers import save_tiny_teacher

    path = save_tiny_teacher(str(tmp_path / "t"))
    import shutil

    shutil.rmtree(os.path.join(path, "text_resampler"))
    with pytest.raises(ValueError, match="lacks text_resampler"):
        load_teacher(path)


def test_teacher_training_resumes_bit_identically_after_a_crash(tmp_path, monkeypatch):
    # the loop draws every batch, time and noise from (seed, step): a run killed after its step-4
    # checkpoint and resumed must continue from step 4 (not start over) and end on the same bytes
    # and the same logged means as one that never stopped. log_every 3 does not divide
    # checkpoint_every 4, so the losses since the last logged mean must survive the crash too.
    from helpers import TINY

    import rmd.toy.teacher as teacher_mod
    from safetensors.torch import load_file

    cfg = TeacherConfig(**TINY, steps=7, batch_size=2, warmup=1, checkpoint_every=4, log_every=3)
    straight = str(tmp_path / "straight")
    teacher_mod.train_teacher(cfg, straight, progress=False)

    real_lr = teacher_mod._lr_at
    steps_run: list[int] = []

    def crash_at_step_5(step, c):
        steps_run.append(step)
        if step == 5 and len(steps_run) == 6:
            raise KeyboardInterrupt("killed")
        return real_lr(step, c)

    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(teacher_mod, "_lr_at", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        teacher_mod.train_teacher(cfg, resumed, progress=False)
    assert os.path.isfile(os.path.join(resumed, "checkpoint.pt"))
    assert not os.path.isdir(os.path.join(resumed, "transformer"))  # no half-finished model folder
    steps_run.clear()
    record = teacher_mod.train_teacher(cfg, resumed, progress=False)
    assert steps_run == [4, 5, 6]

    with open(os.path.join(straight, "training_record.json")) as f:
        want = [(p["step"], p["loss"]) for p in json.load(f)["loss_curve"]]
    assert [(p["step"], p["loss"]) for p in record["loss_curve"]] == want and [s for s, _ in want] == [3, 6, 7]
    for part in ("transformer", "text_encoder", "text_resampler"):
        names = [n for n in os.listdir(os.path.join(straight, part)) if n.endswith(".safetensors")]
        assert names
        for name in names:
            a = load_file(os.path.join(straight, part, name))
            b = load_file(os.path.join(resumed, part, name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(os.path.join(resumed, "checkpoint.pt"))  # removed once the model is written


def test_speed_settings_train_the_same_model_up_to_rounding(tmp_path):
    # torch.compile and bf16 autocast change how the step is computed, not what is trained: same
    # batches, same init, the same losses up to rounding, and a model folder that loads as any other
    from helpers import TINY

    import rmd.toy.teacher as teacher_mod

    with pytest.raises(ValueError, match="bf16_resolutions"):
        TeacherConfig(**TINY, bf16_resolutions=(64,))
    # one resolution: one graph to compile (the slow part of this test)
    cfg = TeacherConfig(**TINY, steps=4, batch_size=4, warmup=1, log_every=1, resolutions=(16,),
                        resolution_weights=(1.0,), target_resolution=16)
    eager = teacher_mod.train_teacher(cfg, str(tmp_path / "eager"), progress=False)
    fast_cfg = cfg.model_copy(update={"compile": True, "bf16_resolutions": (16,)})
    fast = teacher_mod.train_teacher(fast_cfg, str(tmp_path / "fast"), progress=False)
    a = [p["loss"] for p in eager["loss_curve"]]
    b = [p["loss"] for p in fast["loss_curve"]]
    assert len(a) == len(b) == 4 and a != b  # bf16 rounding shows
    assert b == pytest.approx(a, rel=2e-2)
    assert fast["config"]["compile"] and fast["config"]["bf16_resolutions"] == [16]
    model = load_teacher(str(tmp_path / "fast"))  # plain parameter names: no trace of the compiled wrapper
    assert not any("_orig_mod" in n for n, _ in model.transformer.named_parameters())
