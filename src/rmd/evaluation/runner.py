"""Compute the metrics on a set of samples with models already loaded (no file checks here).

:func:`evaluate` is what ``rmd eval`` runs once its preflight (weights, packages, inputs) has
passed and the models are loaded; it is also the Python entry point, and the seam the tests use
to put tiny models in place of the real backbones.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .clip_metrics import AESTHETIC_SCALING, CLIP_SCALING, AestheticHead, CLIPBundle, aesthetic_scores, clip_scores
from .fid import FID_SCALING, fid_from_features, folder_features
from .hps import HPS_SCALING, HPSScorer, per_category
from .inputs import Sample

METRICS = ("clip", "aesthetic", "hps", "fid")


def _summary(values: list[float], scale: float = 1.0) -> dict:
    v = np.asarray(values, dtype=np.float64) * scale
    return {"value": float(v.mean()), "n": int(v.size), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def evaluate(samples: Sequence[Sample], metrics: Sequence[str], *, clip: Optional[CLIPBundle] = None,
             aesthetic_head: Optional[AestheticHead] = None, hps: Optional[HPSScorer] = None,
             inception: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             reference: Optional[Sequence[str]] = None, hps_categories: Optional[dict[str, str]] = None,
             batch_size: int = 16, progress: Optional[Callable[[str], None]] = None,
             backbones: Optional[dict[str, Any]] = None) -> dict:
    """{metric: {"value", "n", "backbone", "scaling", ...}} for the requested metrics."""
    from PIL import Image

    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    backbones = dict(backbones or {})
    per_image: dict[str, list[float]] = {m: [] for m in ("clip", "aesthetic", "hps")}
    pairwise = [m for m in ("clip", "aesthetic", "hps") if m in metrics]
    for start in range(0, len(samples) if pairwise else 0, batch_size):
        chunk = samples[start: start + batch_size]
        images = []
        for s in chunk:
            with Image.open(s.path) as im:
                images.append(im.convert("RGB"))
        prompts = [s.prompt or "" for s in chunk]
        if "clip" in metrics or "aesthetic" in metrics:
            assert clip is not None, "CLIP model needed"
            img_emb = clip.image_embeddings(images)
            if "clip" in metrics:
                per_image["clip"] += clip_scores(img_emb, clip.text_embeddings(prompts)).tolist()
            if "aesthetic" in metrics:
                assert aesthetic_head is not None, "aesthetic head needed"
                per_image["aesthetic"] += aesthetic_scores(aesthetic_head, img_emb).tolist()
        if "hps" in metrics:
            assert hps is not None, "HPS scorer needed"
            per_image["hps"] += hps.cosines(images, prompts).tolist()
        if progress:
            progress(f"scored {min(start + batch_size, len(samples))}/{len(samples)} images")

    out: dict[str, dict] = {}
    if "clip" in metrics:
        out["clip"] = {**_summary(per_image["clip"]), "backbone": clip.backbone(), "scaling": CLIP_SCALING}
    if "aesthetic" in metrics:
        sizes = [aesthetic_head.layers[i].in_features for i in AestheticHead.LINEAR_INDICES] + [1]
        out["aesthetic"] = {**_summary(per_image["aesthetic"]),
                            "backbone": {"head": "LAION improved aesthetic predictor MLP (no activations)",
                                         "head_sizes": sizes, **backbones.get("aesthetic", {}),
                                         "embedding": clip.backbone()},
                            "scaling": AESTHETIC_SCALING}
    if "hps" in metrics:
        raw = _summary(per_image["hps"])
        entry = {**_summary(per_image["hps"], 100.0), "value_raw": raw["value"], "backbone": hps.info,
                 "scaling": HPS_SCALING}
        if hps_categories is not None:
            entry.update(per_category(per_image["hps"], [s.prompt or "" for s in samples], hps_categories))
        out["hps"] = entry
    if "fid" in metrics:
        assert inception is not None and reference is not None, "FID needs a feature extractor and --reference"
        if progress:
            progress(f"FID features: {len(samples)} samples, {len(reference)} reference images")
        fa = folder_features([s.path for s in samples], inception, batch_size)
        fb = folder_features(list(reference), inception, batch_size)
        entry = {"value": fid_from_features(fa, fb), "n": len(samples), "n_reference": len(reference),
                 "feature_dim": int(fa.shape[1]), "backbone": backbones.get("fid", {"model": "custom extractor"}),
                 "scaling": FID_SCALING}
        if min(len(fa), len(fb)) < fa.shape[1]:
            entry["note"] = (f"fewer images than feature dimensions ({fa.shape[1]}): the covariances are singular and "
                             "FID is strongly biased; published FIDs use 10k-50k images")
        out["fid"] = entry
    return out


def describe_inputs(images: str, samples: Sequence[Sample], prompts_file: Optional[str],
                    reference: Optional[str], n_reference: int) -> dict:
    return {"images": os.path.abspath(images), "n_images": len(samples),
            "prompts_from": os.path.abspath(prompts_file) if prompts_file else "sidecar NNNNNN.json files",
            "reference": os.path.abspath(reference) if reference else None,
            "n_reference": n_reference if reference else None}
