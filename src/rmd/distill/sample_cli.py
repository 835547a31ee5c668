"""``rmd sample``: sample the cascade (Algorithm 2) with a distilled generator from a run folder.

The run's ``config.yaml`` names the teacher, the plan and the sampling settings; the
generator LoRA comes from the run's export (``final``), its newest complete checkpoint
(``latest``) or the checkpoint of a given step.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch

from .config import RunConfig, load_run_config
from .train import (LORA_WEIGHT_NAME, Student, _user_error, build_student, checkpoint_name, complete_checkpoints,
                    image_grid, load_lora_weights, sample_images)


def generator_weights(run_dir: str, checkpoint: Union[str, int, None] = None) -> tuple[str, bool]:
    """(path of the generator LoRA file, is_export) for ``final`` / ``latest`` / a step number.

    ``None`` means ``final`` when the run has been exported, else ``latest``.
    """
    export = os.path.join(run_dir, "export", "generator_lora", LORA_WEIGHT_NAME)
    found = complete_checkpoints(run_dir)
    if checkpoint is None:
        checkpoint = "final" if os.path.isfile(export) else "latest"
    if checkpoint == "final":
        if not os.path.isfile(export):
            raise _user_error(f"{run_dir} has no exported generator yet (the run has not finished); "
                              "use --checkpoint latest or a step number")
        return export, True
    if not found:
        raise _user_error(f"{run_dir} has no complete checkpoint; is it a `rmd distill` run folder?")
    if checkpoint == "latest":
        return os.path.join(found[-1][1], "generator.safetensors"), False
    try:
        step = int(checkpoint)
    except ValueError:
        raise _user_error(f"--checkpoint must be final, latest or a step number, got {checkpoint!r}") from None
    steps = {s: p for s, p in found}
    if step not in steps:
        raise _user_error(f"no checkpoint {checkpoint_name(step)} in {run_dir}; available steps: {sorted(steps)}")
    return os.path.join(steps[step], "generator.safetensors"), False


def load_run(run_dir: str, checkpoint: Union[str, int, None] = None,
             device: Union[str, torch.device] = "cpu") -> Student:
    """The run's teacher with the trained generator LoRA loaded (the fake score stays at its init)."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise _user_error(f"{run_dir} has no config.yaml; give the folder a `rmd distill --out` wrote")
    cfg: RunConfig = load_run_config(cfg_path)
    path, is_export = generator_weights(run_dir, checkpoint)
    student = build_student(cfg, torch.device(device), synced=False)
    load_lora_weights(student.base, "generator", path, prefix=student.backbone.lora_prefix if is_export else None)
    student.base.role("generator")
    return student


def sample_run(run_dir: str, prompts: Sequence[str], seeds: Sequence[int], checkpoint: Union[str, int, None] = None,
               device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Images in [-1, 1], one per (prompt, seed)."""
    return sample_images(load_run(run_dir, checkpoint, device), prompts, seeds)


def run_sample_command(args: Any) -> None:
    """``rmd sample --run DIR --prompt TEXT --out FILE.png [--seed S] [--num-images N] [--checkpoint C]``.

    ``C`` is ``final`` (the export), ``latest`` (the newest checkpoint) or a step number.
    """
    if not args.out.lower().endswith(".png"):
        raise _user_error(f"--out must be a .png file, got {args.out!r}")
    if args.num_images < 1:
        raise _user_error("--num-images must be at least 1")
    device: Optional[str] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seeds = [args.seed + i for i in range(args.num_images)]
    try:
        images = sample_run(args.run, [args.prompt] * len(seeds), seeds, args.checkpoint, device)
    except ValueError as e:  # e.g. a prompt the toy tokenizer cannot take
        raise _user_error(str(e)) from None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    image_grid(images).save(args.out)
    print(f"wrote {args.out} ({len(seeds)} image(s), seeds {seeds[0]}..{seeds[-1]})")
