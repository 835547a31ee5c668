"""``rmd sample``: sample the cascade (Algorithm 2) with a distilled generator from a run folder.

The run's ``config.yaml`` names the teacher, the plan and the sampling settings; the
generator LoRA comes from the run's export (``final``), its newest complete checkpoint
(``latest``) or the checkpoint of a given step; a run with ``generator_ema`` samples its average.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch

from .config import RunConfig, load_run_config
from ..lora import LORA_WEIGHT_NAME
from .train import (EMA_FILE, Student, _user_error, build_student, check_writable_folder, checkpoint_name,
                    complete_checkpoints, image_grid, load_lora_weights, sample_images)


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
        return _checkpoint_generator(found[-1][1]), False
    try:
        step = int(checkpoint)
    except ValueError:
        raise _user_error(f"--checkpoint must be final, latest or a step number, got {checkpoint!r}") from None
    steps = {s: p for s, p in found}
    if step not in steps:
        raise _user_error(f"no checkpoint {checkpoint_name(step)} in {run_dir}; available steps: {sorted(steps)}")
    return _checkpoint_generator(steps[step]), False


def _checkpoint_generator(folder: str) -> str:
    """The weights to sample from a checkpoint: its generator EMA when the run keeps one, as the export does."""
    ema = os.path.join(folder, EMA_FILE)
    return ema if os.path.isfile(ema) else os.path.join(folder, "generator.safetensors")


def load_run(run_dir: str, checkpoint: Union[str, int, None] = None,
             device: Union[str, torch.device] = "cpu") -> Student:
    """The run's teacher with the trained generator LoRA loaded (the fake score stays at its init)."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise _user_error(f"{run_dir} has no config.yaml; give the folder a `rmd distill --out` wrote")
    cfg: RunConfig = load_run_config(cfg_path)
    path, is_export = generator_weights(run_dir, checkpoint)
    student = build_student(cfg, torch.device(device), synced=False, sampling=True)
    load_lora_weights(student.base, "generator", path, prefix=student.backbone.lora_prefix if is_export else None)
    student.base.role("generator")
    return student


def sample_run(run_dir: str, prompts: Sequence[str], seeds: Sequence[int], checkpoint: Union[str, int, None] = None,
               device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Images in [-1, 1], one per (prompt, seed)."""
    return sample_images(load_run(run_dir, checkpoint, device), prompts, seeds)


def _is_video_run(run_dir: str) -> bool:
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise _user_error(f"{run_dir} has no config.yaml; give the folder a `rmd distill --out` wrote")
    return load_run_config(cfg_path).frames is not None


def run_sample_command(args: Any) -> None:
    """``rmd sample --run DIR (--prompt TEXT --out FILE.png | --prompts FILE --out DIR) [--seed S] ...``.

    With ``--prompt``: one PNG (a grid of ``--num-images`` seeds S, S+1, ...). With ``--prompts``
    (a .txt, .jsonl or .csv file, :mod:`rmd.prompts`): one PNG and one metadata JSON per prompt
    in the folder ``--out``, seed = the file's or S + index. Under ``torchrun`` each of the N
    processes takes every N-th prompt; per-image seeds make the images the same for any N.
    ``--checkpoint`` is ``final`` (the export), ``latest`` (the newest checkpoint) or a step number.
    """
    import json

    from ..media import save_sample
    from ..prompts import PromptFileError, read_prompt_file, seeds_for

    if (args.prompt is None) == (args.prompts is None):
        raise _user_error("give --prompt TEXT (one image or a grid) or --prompts FILE (one image per prompt)")
    if args.num_images < 1 or args.batch_size < 1:
        raise _user_error("--num-images and --batch-size must be at least 1")
    if args.seed < 0:
        raise _user_error(f"--seed must be a non-negative integer, got {args.seed}")
    if not os.path.isdir(args.run):
        raise _user_error(f"--run {args.run!r} is not a folder; give the --out folder of a `rmd distill` run")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device: Optional[str] = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if args.prompt is not None:
        video = _is_video_run(args.run)
        suffix = ".mp4" if video else ".png"
        if not args.out.lower().endswith(suffix):
            raise _user_error(f"--out must be a {suffix} file with --prompt for this run, got {args.out!r}")
        if video and args.num_images > 1:
            raise _user_error("a video run writes one MP4 per --prompt; use --prompts FILE for several videos")
        check_writable_folder(os.path.dirname(os.path.abspath(args.out)), "--out's folder")
        seeds = [args.seed + i for i in range(args.num_images)]
        try:
            images = sample_run(args.run, [args.prompt] * len(seeds), seeds, args.checkpoint, device)
        except ValueError as e:  # e.g. a prompt the toy tokenizer cannot take
            raise _user_error(str(e)) from None
        if video:
            from ..media import save_video

            save_video(images[0], args.out)
        else:
            image_grid(images).save(args.out)
        print(f"wrote {args.out} ({len(seeds)} sample(s), seeds {seeds[0]}..{seeds[-1]})")
        return

    try:  # everything about the file is checked before a model is loaded
        pf = read_prompt_file(args.prompts)
    except PromptFileError as e:
        raise _user_error(str(e)) from None
    if args.out.lower().endswith((".png", ".mp4")):
        raise _user_error(f"with --prompts, --out is a folder (one PNG or MP4 + JSON per prompt), got {args.out!r}")
    check_writable_folder(args.out, "--out")
    seeds = seeds_for(pf.entries, args.seed)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    mine = list(range(rank, len(pf.entries), world))
    taken = [i for i in mine if any(os.path.exists(os.path.join(args.out, f"{i:06d}{x}")) for x in (".png", ".mp4"))]
    if taken and not args.overwrite:
        raise _user_error(f"--out {args.out!r} already holds {len(taken)} of these samples (e.g. {taken[0]:06d}.png); "
                          "pass --overwrite to replace them, or choose another folder")
    student = load_run(args.run, args.checkpoint, device)
    try:  # the tokenizer's own limits, for all prompts at once, before any image is made
        student.backbone.encode([pf.entries[i].text for i in mine] or [""])
    except ValueError:
        for i in mine:  # name the first prompt it refuses, by its line in the file
            try:
                student.backbone.encode([pf.entries[i].text])
            except ValueError as e:
                raise _user_error(f"{args.prompts}, line {pf.entries[i].line}: {e}") from None
        raise _user_error(f"{args.prompts}: the text encoder refused the prompts as a batch but took each alone; "
                          "use --batch-size 1") from None
    written = 0
    for start in range(0, len(mine), args.batch_size):
        chunk = mine[start: start + args.batch_size]
        images = sample_images(student, [pf.entries[i].text for i in chunk], [seeds[i] for i in chunk])
        for i, img in zip(chunk, images):
            stem = os.path.join(args.out, f"{i:06d}")
            written_path = save_sample(img, stem)
            meta = {"index": i, "file": os.path.basename(written_path), "prompt": pf.entries[i].text, "seed": seeds[i], "line": pf.entries[i].line,
                    "run": os.path.abspath(args.run), "checkpoint": args.checkpoint or "default",
                    "recipe": student.cfg.recipe, "method": student.cfg.method,
                    "plan": [f"{st.size[0]}x{st.size[1]}" for st in student.cfg.plan().steps],
                    "sampling": student.cfg.sampling.model_dump()}
            with open(stem + ".json", "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
            written += 1
    skipped = f"; {pf.blank_lines} blank line(s) skipped" if pf.blank_lines else ""
    part = f" (process {rank} of {world})" if world > 1 else ""
    print(f"wrote {written} sample(s) with metadata to {args.out}{part}{skipped}")
