"""The toy benchmark: evaluate generators of 32 px images with the toy evaluator.

A *row* is a named generator ``generate(prompts, seeds) -> (B, 3, H, W)`` images in
[-1, 1] (any H = W; resized to 32 px for measuring). :func:`evaluate_rows` runs each
generator once on the evaluation prompts and scores it (:mod:`rmd.toy.metrics`)
against a reference set of real renders of the same scenes:

* scenes: ``sample_scenes(num_images, seed, split="all")``; prompts: ``prompt_for``
  with a variant per image; generation seeds, reference layout seeds and the ``real``
  row's layout seeds are drawn from one stream seeded by ``seed``, all distinct;
* outputs are clamped to [-1, 1] first, as saving them as 8-bit images would.

Standard rows (``rmd toy eval``):

* ``real``: a second, independent render set of the same scenes -- the floor of fd
  and the ceiling of alignment;
* ``teacher``: the teacher at its target resolution, ``steps`` deterministic Euler
  steps (:func:`rmd.sampler.sample` with eta = 1 on a one-stage plan of uniform times)
  with classifier-free guidance; nfe = 2 x steps (1 x when guidance is 1);
* ``teacher-low``: the same at the lowest training resolution (8 px), bilinearly
  upsampled to the target: what a cascade's first stage alone would give;
* ``real-blur`` and ``real-noise`` (not in the default list): the ``real`` renders blurred
  by a 0.5 px Gaussian, or with Gaussian pixel noise of std 0.1. Both are barely visible
  and leave every attribute readable, so their distances tell what size of FD is small.

``--run NAME=DIR`` adds a distilled generator (a finished ``rmd distill`` folder) as a
row, sampled with its own plan and sampling settings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .evaluator import Readout, ToyEvaluator, load_evaluator, prepare
from .metrics import compute_metrics
from .world import ATTRIBUTES, Scene, prompt_for, render, sample_scenes

GenerateFn = Callable[[list[str], list[int]], torch.Tensor]
STANDARD_ROWS = ("real", "teacher", "teacher-low", "real-blur", "real-noise")
# The reference rows' perturbations: barely visible at 32 px, they give the Frechet distance a scale
REAL_BLUR_SIGMA = 0.5  # px, Gaussian
REAL_NOISE_STD = 0.1  # on [-1, 1] pixel values, Gaussian
TARGET = 32


@dataclass
class Row:
    """A named generator; ``nfe`` = network evaluations per image (CFG counted), if meaningful."""

    name: str
    generate: GenerateFn
    nfe: Optional[float] = None


@dataclass
class EvalSet:
    """Evaluation prompts with their scenes and seeds, and the real reference renders."""

    scenes: list[Scene]
    prompts: list[str]
    seeds: list[int]  # generation seeds, one per image
    reference: torch.Tensor  # (N, 3, 32, 32) real renders of ``scenes`` (layout seeds ``reference_seeds``)
    reference_seeds: list[int]
    real_seeds: list[int]  # layout seeds of the ``real`` row's independent render set

    def __len__(self) -> int:
        return len(self.scenes)


def make_eval_set(num_images: int, seed: int = 0) -> EvalSet:
    """The evaluation prompts for ``(num_images, seed)`` and their reference renders."""
    if num_images < 2:
        raise ValueError(f"num_images must be at least 2 (the Frechet distance fits a covariance), got {num_images}")
    scenes = sample_scenes(num_images, seed, split="all")
    rng = random.Random(seed * 1_000_033 + 7)  # a stream apart from the scene draw
    # image by image (prompt variant, generation seed, reference seed, real-row seed), so image i does
    # not depend on num_images: the first k images of a run are those of a run with num_images = k;
    # seeds are redrawn on a repeat, so no layout appears twice across the sets
    used: set[int] = set()

    def fresh() -> int:
        while (v := rng.randrange(2**31)) in used:
            pass
        used.add(v)
        return v

    prompts, seeds, ref_seeds, real_seeds = [], [], [], []
    for s in scenes:
        prompts.append(prompt_for(s, rng.randrange(2**31)))
        seeds.append(fresh())
        ref_seeds.append(fresh())
        real_seeds.append(fresh())
    return EvalSet(scenes, prompts, seeds, render(scenes, TARGET, ref_seeds), ref_seeds, real_seeds)


def real_generator(eval_set: EvalSet) -> GenerateFn:
    """Renders the eval scenes with the independent ``real_seeds`` (prompts must be the eval set's)."""

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if list(prompts) != eval_set.prompts:
            raise ValueError("the real row renders the eval set's own scenes; call it with eval_set.prompts")
        return render(eval_set.scenes, TARGET, eval_set.real_seeds)

    return generate


def perturbed_real_generator(eval_set: EvalSet, name: str) -> GenerateFn:
    """The ``real`` row's renders, blurred (``real-blur``) or with pixel noise (``real-noise``, seeded by image)."""
    from .evaluator import gaussian_blur

    base = real_generator(eval_set)

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        x = base(prompts, seeds)
        if name == "real-blur":
            return gaussian_blur(x, torch.full((x.shape[0],), REAL_BLUR_SIGMA))
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        return x + REAL_NOISE_STD * noise

    return generate


def teacher_generator(teacher, steps: int = 50, guidance: Optional[float] = None, resolution: Optional[int] = None,
                      batch_size: int = 256, progress: bool = False) -> tuple[GenerateFn, float]:
    """Deterministic Euler sampling of a :class:`rmd.toy.teacher.ToyTeacher` with CFG, at ``resolution``.

    One stage, uniform times ``t_i = 1 - i / steps``, eta = 1; the last step returns x0_hat.
    Samples below the target size are bilinearly upsampled to it (:func:`rmd.upsample.upsample`).
    ``progress`` shows a step bar on stderr. Returns ``(generate, nfe)``.
    """
    from ..denoisers import CFGDenoiser
    from ..plan import make_plan
    from ..sampler import sample
    from ..upsample import upsample

    target = teacher.config.target_resolution
    res = resolution or target
    w = teacher.config.guidance_scale if guidance is None else float(guidance)
    plan = make_plan(steps, [res])
    denoiser = CFGDenoiser(teacher.denoiser(), uncond=teacher.text.encode([""]), scale=w)

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        from tqdm.auto import tqdm

        cond = teacher.text.encode(list(prompts))
        chunks = -(-len(prompts) // batch_size)
        with tqdm(total=steps * chunks, desc=f"teacher {res} px", disable=not progress, leave=False) as bar:
            x = sample(denoiser, plan, cond, seeds, eta=1.0, gamma=1.0, batch_size=batch_size,
                       callback=lambda *_: bar.update())
        return upsample(x, (target, target)) if res != target else x

    return generate, float(steps * (1 if w == 1.0 else 2))


def evaluate_row(row: Row, eval_set: EvalSet, evaluator: ToyEvaluator,
                 reference_readout: Optional[Readout] = None) -> tuple[dict, torch.Tensor]:
    """Generate the eval set with ``row.generate``, time it, and score it; returns (metrics row, images at 32 px)."""
    n = len(eval_set)
    start = time.perf_counter()
    images = row.generate(list(eval_set.prompts), list(eval_set.seeds))
    seconds = time.perf_counter() - start
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != n or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"row {row.name!r}: the generator must return ({n}, 3, H, W) images, got {shape}")
    images = prepare(images.detach().cpu(), TARGET).clamp(-1.0, 1.0)
    ref_read = reference_readout if reference_readout is not None else evaluator.read(eval_set.reference)
    m = compute_metrics(images, evaluator.read(images), eval_set.scenes, eval_set.reference, ref_read, TARGET)
    result = {
        "name": row.name,
        "alignment": m["alignment"],
        "fd": m["fd"],
        "detail": m["detail"],
        "degraded_rate": m["degraded_rate"],
        "nfe": row.nfe,
        "seconds_per_image": seconds / n,
        "alignment_se": m["alignment_se"],
        "alignment_heldout": m["alignment_heldout"],
        "per_attribute": m["per_attribute"],
        "num_images": n,
        "num_heldout": m["num_heldout"],
    }
    return result, images


def evaluate_rows(rows: Sequence[Row], num_images: int = 256, seed: int = 0,
                  evaluator: Optional[ToyEvaluator] = None, eval_set: Optional[EvalSet] = None,
                  return_images: bool = False):
    """Score every row on one eval set (built from ``num_images``/``seed`` unless given).

    Returns the list of metrics rows (dicts with name, alignment, fd, detail,
    degraded_rate, nfe, seconds_per_image, alignment_heldout, per_attribute, num_images,
    num_heldout), and with ``return_images`` also ``{name: (N, 3, 32, 32) images}``.
    """
    evaluator = evaluator if evaluator is not None else load_evaluator()
    eval_set = eval_set if eval_set is not None else make_eval_set(num_images, seed)
    ref_read = evaluator.read(eval_set.reference)
    results, images = [], {}
    for row in rows:
        result, imgs = evaluate_row(row, eval_set, evaluator, ref_read)
        results.append(result)
        images[row.name] = imgs
    return (results, images) if return_images else results


# --- the command ---------------------------------------------------------------------------


def standard_rows(names: Sequence[str], eval_set: EvalSet, teacher_path: Optional[str] = None, steps: int = 50,
                  guidance: Optional[float] = None, progress: bool = False) -> list[Row]:
    """The named standard rows; the teacher is loaded only if a teacher row is asked for."""
    unknown = [n for n in names if n not in STANDARD_ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; choose from {list(STANDARD_ROWS)}")
    teacher = None
    if any(n.startswith("teacher") for n in names):
        from .teacher import load_teacher

        teacher = load_teacher(teacher_path)
    rows = []
    for name in names:
        if name == "real":
            rows.append(Row("real", real_generator(eval_set), 0.0))
        elif name.startswith("real-"):
            rows.append(Row(name, perturbed_real_generator(eval_set, name), 0.0))
        else:
            res = min(teacher.config.resolutions) if name == "teacher-low" else None
            gen, nfe = teacher_generator(teacher, steps, guidance, res, progress=progress)
            rows.append(Row(name, gen, nfe))
    return rows


def format_table(results: Sequence[dict]) -> str:
    """A fixed-width text table of metrics rows (per-attribute accuracies abbreviated)."""
    attrs = list(ATTRIBUTES)
    head = (f"{'name':<14} {'align':>6} {'held':>6} " + " ".join(f"{a[:5]:>5}" for a in attrs)
            + f" {'fd':>8} {'detail':>6} {'degr':>5} {'nfe':>5} {'s/img':>7}")
    lines = [head]
    for r in results:
        held = "-" if r.get("alignment_heldout") is None else f"{r['alignment_heldout']:.3f}"
        per = r.get("per_attribute", {})
        nfe = "-" if r["nfe"] is None else f"{r['nfe']:g}"
        lines.append(f"{r['name']:<14} {r['alignment']:>6.3f} {held:>6} "
                     + " ".join(f"{per.get(a, float('nan')):>5.2f}" for a in attrs)
                     + f" {r['fd']:>8.3f} {r['detail']:>6.3f} {r['degraded_rate']:>5.2f} {nfe:>5} "
                     f"{r['seconds_per_image']:>7.4f}")
    n = results[0]["num_images"] if results else 0
    lines.append(f"({n} images; align = share of prompt attributes read back, held = on held-out (shape, colour) "
                 "pairs; fd = Frechet distance of evaluator features to real renders; detail = high-frequency "
                 "energy / real; degr = share flagged degraded)")
    order = {r["name"]: i for i, r in enumerate(results)}
    for r in results:  # with --fd-bootstrap: paired FD differences, each pair once
        for other, d in r.get("fd_diff", {}).items():
            if order[other] > order[r["name"]]:
                lines.append(f"fd {r['name']} - {other}: {d['diff']:+.1f} +- {d['se']:.1f} (paired bootstrap sd; "
                             f"fd {r['name']} +- {r['fd_se']:.1f})")
    return "\n".join(lines)


def write_grid(path: str, images: dict[str, torch.Tensor], per_row: int = 16, scale: int = 2) -> None:
    """A PNG with one labelled strip of the first ``per_row`` images per row name."""
    from PIL import Image, ImageDraw

    label_w, pad = 90, 2
    cell = TARGET * scale
    cols = min(per_row, max(len(v) for v in images.values()))
    canvas = Image.new("RGB", (label_w + cols * (cell + pad), len(images) * (cell + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (name, imgs) in enumerate(images.items()):
        y = r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill=(0, 0, 0))
        for c, img in enumerate(imgs[:cols]):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (cell + pad), y))
    tmp = f"{path}.tmp.png"
    canvas.save(tmp)
    os.replace(tmp, path)


def run_eval_command(args: argparse.Namespace) -> None:
    """``rmd toy eval``: evaluate the rows in ``args.rows``; print JSON (``--json``) or a table."""
    from ..cli import UserError

    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    if not names and not args.run:
        raise UserError("--rows is empty; give e.g. --rows real,teacher,teacher-low")
    if len(set(names)) != len(names):
        raise UserError(f"--rows lists a row twice: {names}")
    if args.num_images < 2:
        raise UserError(f"--num-images must be at least 2 (the Frechet distance fits a covariance), "
                        f"got {args.num_images}")
    if args.steps < 1:
        raise UserError(f"--steps must be a positive integer, got {args.steps}")
    if args.fd_bootstrap and args.fd_bootstrap < 2:
        raise UserError(f"--fd-bootstrap takes a number of rounds of at least 2, got {args.fd_bootstrap}")
    runs = []
    for item in args.run or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--run takes NAME=DIR (a finished `rmd distill` folder or a shipped student's folder), "
                            f"got {item!r}")
        if name in names or name in [r[0] for r in runs]:
            raise UserError(f"--run {item}: the row name {name!r} is taken; choose another")
        runs.append((name, path))
    try:
        eval_set = make_eval_set(args.num_images, args.seed)
        rows = standard_rows(names, eval_set, args.teacher, args.steps, args.guidance, progress=sys.stderr.isatty())
        if runs:
            from ..demo import run_method
            from .teacher import TEACHER_DIR

            teacher_dir = args.teacher or TEACHER_DIR  # a shipped student is checked against the teacher rows' teacher
            rows += [Row(name, m.generate, m.nfe) for name, m in ((n, run_method(n, p, teacher_dir)) for n, p in runs)]
        evaluator = load_evaluator()
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    results, images = evaluate_rows(rows, evaluator=evaluator, eval_set=eval_set, return_images=True)
    if args.fd_bootstrap:
        from .metrics import paired_fd_bootstrap

        spread = paired_fd_bootstrap({k: evaluator.read(v).features for k, v in images.items()},
                                     evaluator.read(eval_set.reference).features, args.fd_bootstrap, args.seed)
        for r in results:
            r.update(spread[r["name"]])
    if args.grid:
        write_grid(args.grid, images)
    print(json.dumps(results, indent=1) if args.json else format_table(results))
