"""Probe: where in a cascade the toy's shape attribute is decided (docs/RESULTS.md, issue 4).

Reads shape and texture back from each sampling step's x0 prediction (bilinearly upsampled to
32 px) for trained runs, next to two limits: real renders drawn at 16 and 8 px, and the teacher
sampled at 16 px. Usage, from the repository root with the package installed:

    python docs/probes/shape_by_step.py NUM_IMAGES NAME=RUN_DIR [NAME=RUN_DIR ...]

RUN_DIR is an `rmd distill --out` folder or a shipped student (src/rmd/assets/toy/students/*).
Prints one JSON object.
"""

import json
import os
import sys

import torch

from rmd.denoisers import CFGDenoiser
from rmd.distill.config import load_run_config
from rmd.distill.sample_cli import load_run
from rmd.distill.train import build_student, load_lora_weights
from rmd.sampler import sample
from rmd.toy.evaluate import make_eval_set, teacher_generator
from rmd.toy.evaluator import load_evaluator
from rmd.toy.metrics import attribute_accuracy
from rmd.toy.teacher import TEACHER_DIR, load_teacher
from rmd.toy.world import render
from rmd.upsample import upsample


def load_student(folder: str):
    if not os.path.isfile(os.path.join(folder, "generator_lora.safetensors")):
        return load_run(folder)
    cfg = load_run_config(os.path.join(folder, "config.yaml"), teacher=TEACHER_DIR)
    student = build_student(cfg, torch.device("cpu"), synced=False, sampling=True)
    load_lora_weights(student.base, "generator", os.path.join(folder, "generator_lora.safetensors"),
                      prefix="transformer")
    student.base.role("generator")
    return student


def main(num_images: int, runs: dict[str, str]) -> dict:
    eval_set = make_eval_set(num_images, 0)
    evaluator = load_evaluator()

    def read(x: torch.Tensor) -> dict:
        x = upsample(x.float(), (32, 32)) if x.shape[-1] != 32 else x
        acc = attribute_accuracy(evaluator.read(x.clamp(-1, 1)), eval_set.scenes)["per_attribute"]
        return {k: round(acc[k], 3) for k in ("shape", "texture")}

    out = {"real 32 px": read(eval_set.reference)}
    for r in (16, 8):
        out[f"real drawn at {r} px"] = read(render(eval_set.scenes, r, eval_set.reference_seeds))
    gen, _ = teacher_generator(load_teacher(), resolution=16)
    out["teacher, 50 steps at 16 px"] = read(gen(eval_set.prompts, eval_set.seeds))
    for name, folder in runs.items():
        student = load_student(folder)
        cfg, settings, backbone = student.cfg, student.cfg.sampling, student.backbone
        den = student.denoiser()
        if settings.guidance_scale != 1.0:
            den = CFGDenoiser(den, backbone.encode([""]), settings.guidance_scale)
        decode = backbone.decode or (lambda x: x)
        with torch.no_grad(), student.base.as_role("generator"):
            final, traj = sample(den, cfg.plan(), backbone.encode(eval_set.prompts), eval_set.seeds,
                                 eta=settings.eta, gamma=settings.gamma, upsample_mode=settings.upsample,
                                 return_intermediates=True)
            out[name] = {f"step {i + 1} x0_hat at {x.shape[-1]} px": read(decode(x))
                         for i, x in enumerate(traj.x0_hat)}
            out[name]["final"] = read(decode(final))
    return out


if __name__ == "__main__":
    n = int(sys.argv[1])
    print(json.dumps(main(n, dict(a.split("=", 1) for a in sys.argv[2:])), indent=1))
