"""``rmd eval``: weights table and checks, offline mode, each metric against a hand computation, the CLI.

Real backbones are replaced by tiny random models built here from the real classes
(transformers CLIPModel, the LAION head layout, torch-fidelity's Inception when importable).
open_clip and torch-fidelity need a torchvision built for the installed torch, which the CPU
build of torch 2.13 does not have; their tests skip in that environment, and CI runs this file
a second time in an environment that has them (torch 2.14.1 + torchvision 0.29.1 with the
``eval`` extra), where RMD_REQUIRE_EVAL_EXTRAS=1 turns a skip into a failure. The HPS and FID
scoring paths are also tested through the documented seams (any encode_image/encode_text model;
any feature extractor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import socket
import string

import numpy as np
import pytest
import torch
from PIL import Image

from rmd.cli import main
from rmd.evaluation import command as eval_command
from rmd.evaluation import weights as W
from rmd.evaluation.clip_metrics import AestheticHead, load_aesthetic_head, load_clip
from rmd.evaluation.fid import fid_from_features, folder_features, frechet_distance, gaussian_stats
from rmd.evaluation.hps import HPSScorer, per_category, preprocess_hps, read_hps_benchmark
from rmd.evaluation.inputs import InputError, read_samples, vbench_export
from rmd.evaluation.runner import evaluate

PROMPTS = ["a red circle", "two blue squares", "a green cat", "a red circle"]


# ----------------------------------------------------------------------------- tiny models and data

def _write_clip_folder(folder: str) -> str:
    from transformers import CLIPConfig, CLIPModel

    import transformers

    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,'-":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")  # character-level BPE: no merges
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 16, "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(folder)
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _write_clip_folder(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(1)
    head = AestheticHead((16, 1024, 128, 64, 16, 1))
    path = str(tmp_path_factory.mktemp("head") / "head.pth")
    torch.save(head.state_dict(), path)
    return path


def _write_samples(folder, prompts=PROMPTS, size=(40, 40), sidecar=True, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, p in enumerate(prompts):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i:06d}.png"))
        if sidecar:  # the layout `rmd sample --prompts` writes
            with open(os.path.join(folder, f"{i:06d}.json"), "w") as f:
                json.dump({"index": i, "prompt": p, "seed": i, "line": i + 1}, f)
    return str(folder)


@pytest.fixture
def samples_dir(tmp_path):
    return _write_samples(tmp_path / "samples")


class TinyHPSModel(torch.nn.Module):
    """encode_image / encode_text over a tiny transformers CLIP: the HPS scoring seam."""

    def __init__(self, bundle):
        super().__init__()
        self.clip = bundle.model

    def encode_image(self, x):
        out = self.clip.get_image_features(pixel_values=x)
        return out if torch.is_tensor(out) else out.pooler_output

    def encode_text(self, ids):
        out = self.clip.get_text_features(input_ids=ids)
        return out if torch.is_tensor(out) else out.pooler_output


def _tiny_hps(bundle) -> HPSScorer:
    def tokenize(prompts):
        return bundle.tokenizer(prompts, padding="max_length", truncation=True, max_length=16,
                                return_tensors="pt")["input_ids"]

    return HPSScorer(TinyHPSModel(bundle), tokenize, image_size=32, info={"model": "tiny test CLIP"})


class TinyFeatures(torch.nn.Module):
    """A random conv feature extractor taking uint8 (N, 3, H, W), like torch-fidelity's Inception."""

    def __init__(self, dim=6):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, dim, 5, stride=2)

    @torch.no_grad()
    def forward(self, x):
        x = torch.nn.functional.interpolate(x.float() / 127.5 - 1, size=(24, 24), mode="bilinear")
        return torch.tanh(self.conv(x)).mean((2, 3))


# ----------------------------------------------------------------------------- weights table and checks

def test_weight_table_names_every_file_with_its_source():
    for metric, keys in W.METRIC_WEIGHTS.items():
        for k in keys:
            spec = W.WEIGHTS[k]
            assert spec.flag.startswith("--") and spec.what and "http" in spec.source, spec
    assert W.WEIGHTS["inception"].sha256.startswith("6726825d")  # the torch.hub prefix in its published name
    assert W.METRIC_WEIGHTS["aesthetic"] == ("clip", "aesthetic_head")


def test_missing_weights_listed_in_one_error_before_any_image_is_read(tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "000000.png").write_bytes(b"not a png")  # reading it would fail differently
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "a.png").write_bytes(b"nor this")

    def boom(*a, **k):
        raise AssertionError("an image or a model was opened before the weights were checked")

    monkeypatch.setattr(Image, "open", boom)
    monkeypatch.setattr("rmd.evaluation.clip_metrics.load_clip", boom)
    code = main(["eval", "--images", str(images), "--reference", str(ref), "--metrics", "clip,aesthetic,hps,fid",
                 "--aesthetic-head", str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err
    assert code == 2
    assert "4 required weight file(s)" in err
    for flag in ("--clip not given", "--aesthetic-head", "nope.pth: no such file", "--hps not given",
                 "--inception not given"):
        assert flag in err, flag
    assert "huggingface.co/openai/clip-vit-large-patch14" in err and "HPS_v2.1_compressed.pt" in err
    assert "Traceback" not in err


def test_weights_dir_supplies_the_published_names(tmp_path, clip_dir):
    wd = tmp_path / "w"
    wd.mkdir()
    os.symlink(clip_dir, wd / "clip-vit-large-patch14")
    (wd / "HPS_v2.1_compressed.pt").write_bytes(b"x")
    paths = W.resolve_paths(["clip", "hps"], {"clip": None, "hps": None}, str(wd))
    assert paths == {"clip": str(wd / "clip-vit-large-patch14"), "hps": str(wd / "HPS_v2.1_compressed.pt")}
    record = W.check_weights(paths)
    assert record["hps"]["hash"].startswith("unknown")
    (wd / "open_clip_pytorch_model.bin").write_bytes(b"y")  # the optional base is picked up when present
    assert "hps_clip" in W.resolve_paths(["hps"], {}, str(wd))


def test_clip_folder_lacking_files_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(W.WeightsError) as e:
        W.check_weights({"clip": str(tmp_path)})
    assert "model.safetensors or pytorch_model.bin" in str(e.value) and "preprocessor_config.json" in str(e.value)


def test_hash_mismatch_and_match(tmp_path, monkeypatch, head_file):
    digest = hashlib.sha256(open(head_file, "rb").read()).hexdigest()
    # the real table: the tiny head is not the published file (its md5 differs)
    with pytest.raises(W.WeightsError) as e:
        W.check_weights({"aesthetic_head": head_file})
    assert "md5" in str(e.value) and "--no-verify-hash" in str(e.value) and "improved-aesthetic-predictor" in str(e.value)
    assert W.check_weights({"aesthetic_head": head_file}, verify_hash=False)["aesthetic_head"]["hash"].startswith("skipped")
    spec = W.WEIGHTS["aesthetic_head"]
    monkeypatch.setitem(W.WEIGHTS, "aesthetic_head", dataclasses.replace(spec, sha256="0" * 64, md5=None))
    with pytest.raises(W.WeightsError, match=f"sha256 {digest} is not the published 0000"):
        W.check_weights({"aesthetic_head": head_file})
    monkeypatch.setitem(W.WEIGHTS, "aesthetic_head", dataclasses.replace(spec, sha256=digest, md5=None))
    assert W.check_weights({"aesthetic_head": head_file})["aesthetic_head"]["hash"] == "verified (sha256)"


def test_offline_mode_makes_hub_access_impossible(monkeypatch):
    import huggingface_hub.constants as hc

    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    before = os.environ.get("HF_HUB_OFFLINE")
    with W.offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
        assert hc.is_offline_mode()
        # rmd's loaders take folders only: a hub id is refused before any library sees it
        with pytest.raises(FileNotFoundError, match="hub id is not accepted"):
            load_clip("openai/clip-vit-large-patch14")
    assert os.environ.get("HF_HUB_OFFLINE") == before


# ----------------------------------------------------------------------------- metrics by hand

def _hand_outputs(bundle, images, prompts):
    inputs = bundle.processor(images=images, return_tensors="pt")
    tok = bundle.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = bundle.model(pixel_values=inputs["pixel_values"], input_ids=tok["input_ids"],
                           attention_mask=tok["attention_mask"])
    return out.image_embeds, out.text_embeds  # normalised by CLIPModel.forward


def _images(folder):
    return [Image.open(os.path.join(folder, n)).convert("RGB") for n in sorted(os.listdir(folder)) if n.endswith(".png")]


def test_clip_score_equals_hand_computation(clip_dir, samples_dir):
    bundle = load_clip(clip_dir)
    samples = read_samples(samples_dir)
    res = evaluate(samples, ["clip"], clip=bundle, batch_size=3)["clip"]
    img, txt = _hand_outputs(bundle, _images(samples_dir), PROMPTS)
    per = 100 * torch.clamp((img * txt).sum(-1), min=0)
    assert res["n"] == 4 and res["value"] == pytest.approx(per.mean().item(), rel=1e-5, abs=1e-5)
    assert res["backbone"]["projection_dim"] == 16 and "torchmetrics" in res["scaling"]


def test_aesthetic_equals_head_applied_by_hand(clip_dir, head_file, samples_dir):
    bundle = load_clip(clip_dir)
    head = load_aesthetic_head(head_file)
    res = evaluate(read_samples(samples_dir), ["aesthetic"], clip=bundle, aesthetic_head=head)["aesthetic"]
    img, _ = _hand_outputs(bundle, _images(samples_dir), PROMPTS)
    sd = torch.load(head_file)
    x = img
    for i in (0, 2, 4, 6, 7):  # no activations, dropout off in eval
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    assert res["value"] == pytest.approx(x.mean().item(), rel=1e-5, abs=1e-6)
    assert res["backbone"]["head_sizes"] == [16, 1024, 128, 64, 16, 1]


def test_aesthetic_head_layout_and_safetensors(tmp_path, head_file):
    from safetensors.torch import save_file

    sd = torch.load(head_file)
    save_file(sd, str(tmp_path / "h.safetensors"))
    a, b = load_aesthetic_head(head_file), load_aesthetic_head(str(tmp_path / "h.safetensors"))
    x = torch.randn(3, 16)
    assert torch.equal(a(x), b(x))
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="layers.0.weight"):
        load_aesthetic_head(str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="ViT-L/14"):  # a head for 16-d embeddings, fed 768-d ones
        from rmd.evaluation.clip_metrics import aesthetic_scores

        aesthetic_scores(a, torch.randn(2, 768))


def test_hps_scoring_path_equals_hand_computation(clip_dir, samples_dir, tmp_path):
    bundle = load_clip(clip_dir)
    scorer = _tiny_hps(bundle)
    samples = read_samples(samples_dir)
    bench = tmp_path / "bench"
    bench.mkdir()
    for cat, ps in {"anime": ["a red circle"], "concept-art": ["two blue squares"], "paintings": [],
                    "photo": ["unused prompt"]}.items():
        (bench / f"{cat}.json").write_text(json.dumps(ps))
    cats = read_hps_benchmark(str(bench))
    res = evaluate(samples, ["hps"], hps=scorer, hps_categories=cats)["hps"]
    x = torch.stack([preprocess_hps(im, 32) for im in _images(samples_dir)])
    ids = bundle.tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        i = torch.nn.functional.normalize(scorer.model.encode_image(x), dim=-1)
        t = torch.nn.functional.normalize(scorer.model.encode_text(ids), dim=-1)
    cos = (i * t).sum(-1)
    assert res["value_raw"] == pytest.approx(cos.mean().item(), abs=1e-6)
    assert res["value"] == pytest.approx(100 * cos.mean().item(), abs=1e-4)
    assert res["per_category"]["anime"] == pytest.approx(100 * (cos[0] + cos[3]).item() / 2, abs=1e-4)
    assert res["n_per_category"] == {"anime": 2, "concept-art": 1, "paintings": 0, "photo": 0}
    assert res["n_outside_benchmark"] == 1


def test_hps_preprocessing_pads_the_short_side_black():
    img = Image.new("RGB", (64, 32), (255, 255, 255))
    x = preprocess_hps(img, 32)
    assert x.shape == (3, 32, 32)
    black = (0 - 0.48145466) / 0.26862954
    assert x[0, 0, 0].item() == pytest.approx(black, abs=1e-5)  # top rows are padding
    assert x[0, 16, 16].item() == pytest.approx((1 - 0.48145466) / 0.26862954, abs=1e-4)
    with pytest.raises(ValueError, match="lacks"):
        read_hps_benchmark(os.path.dirname(__file__))


def test_per_category_counts_outside_prompts():
    out = per_category([0.2, 0.4, 0.3], ["a", "b", "c"], {"a": "photo", "b": "photo"})
    assert out["per_category"] == {"photo": pytest.approx(30.0)} and out["n_outside_benchmark"] == 1


# ----------------------------------------------------------------------------- FID

def test_frechet_distance_closed_form_two_gaussians():
    rng = np.random.default_rng(0)
    d = 5
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # commuting: W2^2 = |dmu|^2 + sum (sqrt a - sqrt b)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # general (non-commuting) covariances: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigh
    A, B = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = A @ A.T + 0.1 * np.eye(d), B @ B.T + 0.1 * np.eye(d)

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T

    r = psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(r @ s2 @ r))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(5)
    # estimated from samples of the two Gaussians
    xa = rng.multivariate_normal(mu1, s1, size=40000)
    xb = rng.multivariate_normal(mu2, s2, size=40000)
    assert fid_from_features(xa, xb) == pytest.approx(expected, rel=0.05)


def test_fid_through_the_feature_seam(tmp_path):
    real = _write_samples(tmp_path / "real", prompts=["p"] * 12, seed=1)
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for n in sorted(os.listdir(real)):
        if n.endswith(".png"):
            arr = np.asarray(Image.open(os.path.join(real, n)), dtype=np.int16)
            Image.fromarray(np.clip(arr // 3, 0, 255).astype(np.uint8)).save(shifted / n)
    # mixed sizes in a reference folder are batched per size
    Image.fromarray(np.zeros((50, 30, 3), np.uint8)).save(tmp_path / "real" / "zz_other_size.png")
    ext = TinyFeatures()
    paths = sorted(os.path.join(real, n) for n in os.listdir(real) if n.endswith(".png"))
    fa = folder_features(paths, ext, batch_size=5)
    assert fa.shape == (13, 6)
    assert np.allclose(fa[3], ext(torch.from_numpy(np.array(Image.open(paths[3]))).permute(2, 0, 1)[None]).numpy(),
                       atol=1e-6)
    samples = read_samples(real)
    same = evaluate(samples, ["fid"], inception=ext, reference=paths)["fid"]
    assert abs(same["value"]) < 1e-6 and same["n"] == 13 and "note" not in same  # 13 images > 6 dims
    other = evaluate(read_samples(str(shifted)), ["fid"], inception=ext, reference=paths)["fid"]
    assert other["value"] > 0.05
    assert other["value"] == pytest.approx(fid_from_features(folder_features(
        sorted(str(p) for p in shifted.glob("*.png")), ext), fa), rel=1e-9)


def _import_or_skip(module: str):
    """The optional package, or a skip; with RMD_REQUIRE_EVAL_EXTRAS=1 (CI's eval-extras stage) a failure."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # also a torchvision built for another torch
        if os.environ.get("RMD_REQUIRE_EVAL_EXTRAS") == "1":
            raise
        pytest.skip(f"{module} not importable here ({type(e).__name__}: {str(e)[:80]})")


def _torch_fidelity_or_skip():
    _import_or_skip("torch_fidelity")


def test_torch_fidelity_inception_loads_local_weights_and_matches(tmp_path, monkeypatch):
    _torch_fidelity_or_skip()
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from rmd.evaluation.fid import load_inception

    captured = {}

    class Capture(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, sd, *a, **k):  # keep the fresh random init
            captured.update({name: v.clone() for name, v in self.state_dict().items()})

    torch.manual_seed(0)
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    Capture("inception-v3-compat", ["2048"])
    path = str(tmp_path / "inception.pth")
    torch.save(captured, path)

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    extract = load_inception(path)  # the same path the command takes
    _write_samples(tmp_path / "real", prompts=["p"] * 4, size=(64, 64), seed=2)
    paths = sorted(str(p) for p in (tmp_path / "real").glob("*.png"))
    fa = folder_features(paths, extract)
    assert fa.shape == (4, 2048) and np.isfinite(fa).all()
    fa = fa[:, :64] * 1e6  # a 2048-d sqrtm takes a minute on 2 cores; the random network's features are tiny
    assert fid_from_features(fa, fa) == pytest.approx(0, abs=1e-3)
    fb = fa + 0.5
    ours = fid_from_features(fa, fb)
    theirs = fid_statistics_to_metric({"mu": fa.mean(0), "sigma": np.cov(fa, rowvar=False)},
                                      {"mu": fb.mean(0), "sigma": np.cov(fb, rowvar=False)}, False)
    assert ours > 0 and ours == pytest.approx(list(theirs.values())[0], rel=1e-4)


def test_gaussian_stats_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(np.zeros((1, 3)))


# ----------------------------------------------------------------------------- open_clip (when importable)

def test_open_clip_tiny_config_through_load_hps(tmp_path):
    open_clip = _import_or_skip("open_clip")
    from rmd.evaluation.hps import load_hps

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "rmd-tiny-hps.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "rmd-tiny-hps.json"))
    model = open_clip.create_model("rmd-tiny-hps", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps.pt")
    scorer = load_hps(str(tmp_path / "hps.pt"), arch="rmd-tiny-hps")
    img = [Image.new("RGB", (40, 40), (200, 10, 10))]
    cos = scorer.cosines(img, ["a red square"])
    with torch.no_grad():
        i = model.encode_image(preprocess_hps(img[0], 32)[None], normalize=True)
        t = model.encode_text(open_clip.get_tokenizer("rmd-tiny-hps")(["a red square"]), normalize=True)
    assert cos.item() == pytest.approx((i * t).sum().item(), abs=1e-5)


# ----------------------------------------------------------------------------- inputs and the CLI

def test_prompts_from_file_or_sidecars(tmp_path):
    d = _write_samples(tmp_path / "s", sidecar=False)
    with pytest.raises(InputError, match="no sidecar JSON"):
        from rmd.evaluation.inputs import require_prompts

        require_prompts(read_samples(d), d, ["clip"])
    pf = tmp_path / "p.txt"
    pf.write_text("first\n\nsecond\nthird\nfourth\n")  # blank lines are not counted, as in `rmd sample`
    assert [s.prompt for s in read_samples(d, str(pf))] == ["first", "second", "third", "fourth"]
    pf.write_text("only one\n")
    with pytest.raises(InputError, match="has 1 prompts"):
        read_samples(d, str(pf))


def test_cli_end_to_end_json(tmp_path, clip_dir, head_file, samples_dir, monkeypatch, capsys):
    # the HPS model and the Inception network are swapped for tiny ones at their loaders (open_clip and
    # torch-fidelity need a torchvision this machine lacks); everything else is the real command
    bundle = load_clip(clip_dir)
    monkeypatch.setattr("rmd.evaluation.hps.load_hps", lambda *a, **k: _tiny_hps(bundle))
    monkeypatch.setattr("rmd.evaluation.fid.load_inception", lambda *a, **k: TinyFeatures())
    monkeypatch.setattr(eval_command, "_package_problems", lambda metrics: [])
    hps_file, inc_file = tmp_path / "HPS_v2.1_compressed.pt", tmp_path / "inception.pth"
    hps_file.write_bytes(b"stand-in")
    inc_file.write_bytes(b"stand-in")
    ref = _write_samples(tmp_path / "ref", prompts=["r"] * 5, seed=9)
    out = tmp_path / "scores.json"
    args = ["eval", "--images", samples_dir, "--clip", clip_dir, "--aesthetic-head", head_file, "--hps", str(hps_file),
            "--inception", str(inc_file), "--reference", ref, "--json", "--out", str(out), "--batch-size", "3"]
    assert main(args) == 2  # the stand-in files are not the published ones
    assert "--no-verify-hash" in capsys.readouterr().err
    assert main(args + ["--no-verify-hash"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    m = printed["metrics"]
    assert set(m) == {"clip", "aesthetic", "hps", "fid"}
    for name, entry in m.items():
        assert {"value", "n", "backbone", "scaling"} <= set(entry), name
        assert np.isfinite(entry["value"]) and entry["n"] == 4
    expected = evaluate(read_samples(samples_dir), ["clip", "aesthetic"], clip=bundle,
                        aesthetic_head=load_aesthetic_head(head_file))
    assert m["clip"]["value"] == pytest.approx(expected["clip"]["value"], rel=1e-6)
    assert m["aesthetic"]["value"] == pytest.approx(expected["aesthetic"]["value"], rel=1e-6)
    assert m["fid"]["n_reference"] == 5 and m["fid"]["value"] > 0
    inputs = printed["inputs"]
    assert inputs["n_images"] == 4 and inputs["prompts_from"].startswith("sidecar")
    assert inputs["weights"]["aesthetic_head"]["hash"].startswith("skipped")
    assert inputs["weights"]["clip"]["source"].startswith("https://huggingface.co/openai/clip-vit-large-patch14")


def test_cli_user_errors(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "--images" in capsys.readouterr().err
    assert main(["eval", "--images", str(tmp_path), "--metrics", "clip,pickscore"]) == 2
    assert "pickscore" in capsys.readouterr().err
    assert main(["eval", "--images", str(tmp_path), "--metrics", "fid"]) == 2
    assert "--reference" in capsys.readouterr().err


def test_vbench_export(tmp_path, capsys):
    vids = tmp_path / "vids"
    vids.mkdir()
    for i, p in enumerate(["a cat surfing", "a dog", "a cat surfing"]):
        (vids / f"{i:06d}.mp4").write_bytes(f"video {i}".encode())
        (vids / f"{i:06d}.json").write_text(json.dumps({"prompt": p}))
    out = tmp_path / "vb"
    assert main(["eval", "--videos", str(vids), "--vbench-export", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["a cat surfing-0.mp4", "a cat surfing-1.mp4", "a dog-0.mp4"]
    assert (out / "a cat surfing-1.mp4").read_bytes() == b"video 2"
    assert f"vbench evaluate --videos_path {out}" in printed and "--mode=custom_input" in printed
    assert main(["eval", "--videos", str(vids), "--vbench-export", str(out)]) == 2  # not empty any more
    (vids / "000001.json").write_text(json.dumps({"prompt": "a/b"}))
    with pytest.raises(InputError, match="file name"):
        vbench_export(str(vids), str(tmp_path / "vb2"))


def test_help_says_to_sample_first(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "rmd sample --run RUN --prompts" in capsys.readouterr().out


def test_cli_table_output_and_prompts_file(tmp_path, clip_dir, head_file, capsys):
    images = _write_samples(tmp_path / "s", sidecar=False)
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS) + "\n")
    args = ["eval", "--images", images, "--clip", clip_dir, "--aesthetic-head", head_file, "--metrics",
            "clip,aesthetic", "--no-verify-hash", "--quiet"]
    assert main(args) == 2  # CLIP score needs prompts: no sidecars, no --prompts
    assert "no sidecar JSON" in capsys.readouterr().err
    assert main(args + ["--prompts", str(pf), "--out", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("clip ") and "n=4" in lines[0] and lines[1].startswith("aesthetic ")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["inputs"]["prompts_from"] == str(pf)
    assert f"{saved['metrics']['clip']['value']:.4f}" in lines[0]
