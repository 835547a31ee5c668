"""HPS v2.1 (Human Preference Score), computed as the hpsv2 package does, from local files only.

Score of one (image, prompt): the cosine of the L2-normalised open_clip ViT-H-14 image and text
features, with the HPS v2.1 checkpoint loaded into the model (hpsv2's ``img_score.score``
returns exactly this, ~0.2-0.35 for real images). Papers, the HPSv2 benchmark table and the RMD
paper (numbers around 30) report it multiplied by 100; ``value`` here is ``100 * mean cosine``
and ``value_raw`` the hpsv2-scale mean.

Preprocessing is hpsv2's validation transform, done here with PIL + torch so that it does not
need torchvision: resize the longest side to the model's image size (bicubic), pad the rest with
black to a square (centred), scale to [0, 1], normalise with the OpenAI CLIP mean/std. For
square images this equals resize + centre crop.

The model is built with ``open_clip.create_model_and_transforms(arch, pretrained=None)`` (no
download possible) and the checkpoint's ``state_dict`` is loaded strictly. The scoring path
(:class:`HPSScorer`) only needs an object with ``encode_image`` / ``encode_text`` and a tokenizer
callable: this is the seam the tests use with a tiny model (open_clip needs a working
torchvision, which the CPU test machine does not have).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HPS_CATEGORIES = ("anime", "concept-art", "paintings", "photo")
HPS_SCALING = ("100 * cos(normalize(image_features), normalize(text_features)) per image, then the mean "
               "(value_raw: the hpsv2 package's own scale, the plain cosine)")


def preprocess_hps(image, size: int) -> torch.Tensor:
    """hpsv2's validation transform (ResizeMaxSize + ToTensor + Normalize) for one PIL image."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        image = image.resize((nw, nh), Image.BICUBIC)
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(image, ((size - nw) // 2, (size - nh) // 2))
        image = canvas
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
    return (x - mean) / std


class HPSScorer:
    """Scores (image, prompt) pairs with any model exposing ``encode_image`` / ``encode_text``."""

    def __init__(self, model: Any, tokenizer: Callable[[list[str]], torch.Tensor], image_size: int,
                 device: str | torch.device = "cpu", info: Optional[dict] = None):
        self.model, self.tokenizer, self.image_size = model, tokenizer, image_size
        self.device = torch.device(device)
        self.info = info or {}

    @torch.no_grad()
    def cosines(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        x = torch.stack([preprocess_hps(im, self.image_size) for im in images]).to(self.device)
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return (img * txt).sum(-1).cpu()


def import_open_clip():
    try:
        import open_clip
    except ImportError as e:
        if e.name == "open_clip":
            raise ImportError("HPS v2.1 needs the open_clip_torch package: pip install 'rmd[eval]'") from None
        raise ImportError(f"open_clip could not be imported ({e}); pip install 'rmd[eval]' (with a torchvision "
                          "built for the installed torch)") from None
    except Exception as e:  # e.g. a torchvision built for another torch (CUDA wheel on a CPU torch)
        raise ImportError(f"open_clip could not be imported ({type(e).__name__}: {e}); it needs a torchvision "
                          "built for the installed torch (for a CPU torch, the CPU torchvision of the same "
                          "release)") from None
    return open_clip


def _checkpoint_state_dict(path: str) -> dict:
    try:  # hpsv2 files hold a dict with 'state_dict' (and plain counters): tensors-only loading first
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an older pickle with other objects in it: the user named this file explicitly
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds no state dict (got {type(sd).__name__})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_hps(checkpoint: str, base: Optional[str] = None, arch: str = "ViT-H-14",
             device: str | torch.device = "cpu") -> HPSScorer:
    """open_clip ``arch`` (no pretrained tag: nothing is downloaded) + optional base weights + the HPS file."""
    open_clip = import_open_clip()
    model = open_clip.create_model(arch, pretrained=None, precision="fp32", device="cpu")
    if base is not None:
        model.load_state_dict(_checkpoint_state_dict(base), strict=False)
    try:
        missing, unexpected = model.load_state_dict(_checkpoint_state_dict(checkpoint), strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{checkpoint} does not fit open_clip {arch}: {str(e)[:400]}") from None
    if unexpected:
        raise ValueError(f"{checkpoint}: {len(unexpected)} weights do not belong to open_clip {arch} "
                         f"(e.g. {unexpected[:3]}); is it an HPS checkpoint for this architecture?")
    if missing and base is None:
        raise ValueError(f"{checkpoint} lacks {len(missing)} weights of open_clip {arch} (e.g. {missing[:3]}); "
                         "give the base open_clip weights with --hps-clip")
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    info = {"model": f"open_clip {arch}", "open_clip_version": getattr(open_clip, "__version__", None),
            "checkpoint": os.path.abspath(checkpoint), "base": os.path.abspath(base) if base else None,
            "image_size": size, "embed_dim": int(getattr(model, "text_projection").shape[-1])
            if hasattr(model, "text_projection") else None,
            "preprocessing": "longest side -> image_size (bicubic), black padding, OpenAI mean/std"}
    return HPSScorer(model, tokenizer, size, device, info)


def read_hps_benchmark(folder: str) -> dict[str, str]:
    """prompt -> category from the HPSv2 benchmark folder (anime.json, concept-art.json, paintings.json,
    photo.json: each a JSON list of prompts, as shipped in hpsv2's benchmark data)."""
    out: dict[str, str] = {}
    missing = [c for c in HPS_CATEGORIES if not os.path.isfile(os.path.join(folder, f"{c}.json"))]
    if missing:
        raise ValueError(f"--hps-benchmark {folder}: lacks {', '.join(c + '.json' for c in missing)} (the HPSv2 "
                         "benchmark prompt files, https://github.com/tgxs002/HPSv2)")
    for c in HPS_CATEGORIES:
        path = os.path.join(folder, f"{c}.json")
        with open(path, encoding="utf-8") as f:
            prompts = json.load(f)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path} must be a JSON list of prompt strings")
        for p in prompts:
            out.setdefault(p.strip(), c)
    return out


def per_category(values: Sequence[float], prompts: Sequence[str], categories: dict[str, str]) -> dict:
    """Mean (x100) per HPSv2 category, their average, and how many images fell outside the benchmark."""
    groups: dict[str, list[float]] = {c: [] for c in HPS_CATEGORIES}
    outside = 0
    for v, p in zip(values, prompts):
        c = categories.get(p.strip())
        if c is None:
            outside += 1
        else:
            groups[c].append(float(v))
    means = {c: 100.0 * float(np.mean(v)) for c, v in groups.items() if v}
    return {"per_category": means, "n_per_category": {c: len(v) for c, v in groups.items()},
            "category_average": float(np.mean(list(means.values()))) if means else None,
            "n_outside_benchmark": outside}
