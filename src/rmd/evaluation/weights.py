"""The weight files every metric needs, checked before any work, and offline mode.

:data:`WEIGHTS` is the declarative table: what each file is, where it comes from, and its
published hash when one is known. :func:`check_weights` checks every file a set of metrics
needs (existence, then the hash unless told not to) and raises ONE :class:`WeightsError`
listing every problem, before an image is read or a model is loaded. :func:`offline` makes a
hub download impossible while metrics are computed: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are
set, huggingface_hub's own flag is switched on, and every loader here passes local paths only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence


class WeightsError(ValueError):
    """Some required weight files are missing or are not the expected files; the message lists all."""


@dataclass(frozen=True)
class WeightSpec:
    key: str  # the argument name (``--clip`` -> "clip")
    flag: str
    what: str
    source: str  # where to get it, as text (no download is ever made)
    default_name: str  # its name under --weights-dir
    kind: str = "file"  # "file" or "folder"
    sha256: Optional[str] = None  # published full sha256, when known
    md5: Optional[str] = None  # published md5, when only that is known
    hash_note: str = "unknown: no published hash found; only existence is checked"
    # a folder: each group is a set of alternatives, one of which must exist in the folder
    folder_files: tuple[tuple[str, ...], ...] = field(default_factory=tuple)


CLIP_FOLDER_FILES = (("config.json",), ("model.safetensors", "pytorch_model.bin"),
                     ("tokenizer.json", "vocab.json"), ("preprocessor_config.json",))

WEIGHTS: dict[str, WeightSpec] = {s.key: s for s in (
    WeightSpec(
        key="clip", flag="--clip",
        what="CLIP ViT-L/14 in the transformers layout (CLIP score; image embeddings for the aesthetic head)",
        source="https://huggingface.co/openai/clip-vit-large-patch14 (config.json, model.safetensors, "
               "tokenizer files, preprocessor_config.json), e.g. `huggingface-cli download "
               "openai/clip-vit-large-patch14 --local-dir DIR` on a machine with network",
        default_name="clip-vit-large-patch14", kind="folder", folder_files=CLIP_FOLDER_FILES,
        hash_note="unknown: a folder; its files are not hashed"),
    WeightSpec(
        key="aesthetic_head", flag="--aesthetic-head",
        what="LAION aesthetic predictor v2 MLP head (768 -> 1024 -> 128 -> 64 -> 16 -> 1) on L2-normalised "
             "CLIP ViT-L/14 image embeddings",
        source="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
               "sac%2Blogos%2Bava1-l14-linearMSE.pth (file sac+logos+ava1-l14-linearMSE.pth)",
        default_name="sac+logos+ava1-l14-linearMSE.pth",
        md5="b1047fd767a00134b8fd6529bf19521a",
        hash_note="md5 as published by a third party that downloads and checks this file "
                  "(aigc-apps EasyAnimate); no published sha256 found"),
    WeightSpec(
        key="hps", flag="--hps",
        what="HPS v2.1 checkpoint (an open_clip ViT-H-14 fine-tuned on human preferences)",
        source="https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt "
               "(https://github.com/tgxs002/HPSv2)",
        default_name="HPS_v2.1_compressed.pt"),
    WeightSpec(
        key="hps_clip", flag="--hps-clip",
        what="(optional) open_clip ViT-H-14 laion2B-s32B-b79K base weights, loaded before the HPS checkpoint "
             "(only needed if the HPS file does not hold every weight)",
        source="https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/main/"
               "open_clip_pytorch_model.bin",
        default_name="open_clip_pytorch_model.bin"),
    WeightSpec(
        key="inception", flag="--inception",
        what="FID Inception-v3 weights (the TF 2015-12-05 graph ported to PyTorch, torch-fidelity layout)",
        source="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth",
        default_name="weights-inception-2015-12-05-6726825d.pth",
        sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
        hash_note="sha256 recorded by a third party; its first 8 digits are the torch.hub hash prefix in "
                  "the published file name"),
)}

# the weights each metric needs; optional ones are checked only when given
METRIC_WEIGHTS: dict[str, tuple[str, ...]] = {
    "clip": ("clip",),
    "aesthetic": ("clip", "aesthetic_head"),
    "hps": ("hps",),
    "fid": ("inception",),
}
OPTIONAL_WEIGHTS: dict[str, tuple[str, ...]] = {"hps": ("hps_clip",)}


def file_digest(path: str, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resolve_paths(metrics: Sequence[str], given: Mapping[str, Optional[str]],
                  weights_dir: Optional[str] = None) -> dict[str, Optional[str]]:
    """key -> path for every weight the metrics need (None = not given and not found in weights_dir)."""
    out: dict[str, Optional[str]] = {}
    for m in metrics:
        for key in METRIC_WEIGHTS[m] + OPTIONAL_WEIGHTS.get(m, ()):
            path = given.get(key)
            if path is None and weights_dir is not None:
                candidate = os.path.join(weights_dir, WEIGHTS[key].default_name)
                if key in METRIC_WEIGHTS[m] or os.path.exists(candidate):
                    path = candidate
            if path is not None or key in METRIC_WEIGHTS[m]:
                out[key] = path
    return out


def _problem(spec: WeightSpec, path: Optional[str], verify_hash: bool) -> tuple[Optional[str], str]:
    """(problem or None, hash status)."""
    if path is None:
        return f"{spec.flag} not given (nor found under --weights-dir as {spec.default_name})", "not checked"
    if spec.kind == "folder":
        if not os.path.isdir(path):
            return f"{spec.flag} {path}: not a folder", "not checked"
        lacking = [" or ".join(g) for g in spec.folder_files
                   if not any(os.path.isfile(os.path.join(path, n)) for n in g)]
        if lacking:
            return f"{spec.flag} {path}: lacks {', '.join(lacking)}", "not checked"
        return None, "not hashed (folder)"
    if not os.path.isfile(path):
        return f"{spec.flag} {path}: no such file", "not checked"
    if not (spec.sha256 or spec.md5):
        return None, "unknown (no published hash)"
    if not verify_hash:
        return None, "skipped (--no-verify-hash)"
    algo, expected = ("sha256", spec.sha256) if spec.sha256 else ("md5", spec.md5)
    got = file_digest(path, algo)
    if got != expected:
        return (f"{spec.flag} {path}: {algo} {got} is not the published {expected}; this is not the expected "
                f"file (pass --no-verify-hash to use it anyway)"), f"mismatch ({algo})"
    return None, f"verified ({algo})"


def check_weights(paths: Mapping[str, Optional[str]], verify_hash: bool = True) -> dict[str, dict]:
    """Check every entry of ``paths`` (key -> path); raise one WeightsError listing every problem.

    Returns key -> {"path", "what", "source", "hash"} for the record of a run.
    """
    problems, record = [], {}
    for key, path in paths.items():
        spec = WEIGHTS[key]
        problem, status = _problem(spec, path, verify_hash)
        record[key] = {"path": os.path.abspath(path) if path else None, "what": spec.what,
                       "source": spec.source, "hash": status}
        if problem:
            problems.append(f"- {problem}\n    what: {spec.what}\n    from: {spec.source}\n    hash: {spec.hash_note}")
    if problems:
        raise WeightsError(f"{len(problems)} required weight file(s) missing or wrong (nothing was loaded; "
                           "rmd never downloads weights, fetch them on a machine with network):\n"
                           + "\n".join(problems))
    return record


OFFLINE_VARS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "DIFFUSERS_OFFLINE": "1"}


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Within the block, the Hugging Face libraries cannot reach the hub (restored afterwards)."""
    import huggingface_hub.constants as hf_constants

    saved_env = {k: os.environ.get(k) for k in OFFLINE_VARS}
    saved_flag = hf_constants.HF_HUB_OFFLINE
    os.environ.update(OFFLINE_VARS)
    hf_constants.HF_HUB_OFFLINE = True  # read once at import time; is_offline_mode() returns it
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
