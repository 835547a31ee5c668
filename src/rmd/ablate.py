"""``rmd ablate STUDY``: the paper's ablations, reproduced on the toy world with one command each.

A *study* is a list of *arms*: a toy recipe plus changes (schedule fields, run-config
keys). One command trains every arm with the same budget (generator updates and batch
size from the recipes, or ``--max-steps``), scores all of them on one evaluation set with
the toy evaluator, times them side by side (:func:`rmd.demo.time_side_by_side`), and
writes ``DIR/STUDY.json``, ``DIR/STUDY.md`` and a plot ``DIR/STUDY.png``.

Run folders live in ``DIR/runs/<key>``, where the key is derived from the arm's resolved
config, so an arm shared by several studies (the default RMD 2+2 appears in most) is
trained once and reused by the others; a folder is reused only if its finished config
equals the arm's (:func:`rmd.demo.train_config`).

Studies (METHOD 5 and 7):

* ``warmup``  -- first-stage warm-up (50 iterations) on and off (issue: RMD training);
* ``gamma``   -- the predicted-noise share at a resolution switch, 0 to 1 (Figure 8);
* ``tau``     -- teacher time drawn inside the stage's interval or over the full range;
* ``table3``  -- with and without cross-resolution matching, with and without the cascade:
  RMD 2+2, the naive cascade ("UP without RM"), the undistilled 2+2 cascade, the 4-step
  full-resolution DMD2 student;
* ``split``   -- thresholds giving 1+3, 2+2, 3+1 (Table 4; -6, -2.5, 0);
* ``stages3`` -- three stages 8 -> 16 -> 32 px: 1+1+2, 1+2+1, 2+1+1 (Table 5).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True)
class Arm:
    """One setting of a study: ``recipe`` with ``schedule`` fields and run-config ``overrides`` changed.

    ``train=False`` evaluates the student at initialisation (its LoRA is zero: the teacher
    itself, sampled with the arm's few-step plan) -- the "no distillation" row.
    """

    label: str
    recipe: str
    schedule: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    train: bool = True


@dataclass(frozen=True)
class Study:
    title: str
    question: str
    arms: tuple[Arm, ...]
    x_label: str  # what varies, for the plot


def _mc(**kw: Any) -> dict[str, Any]:
    return {"method_config": kw}


STUDIES: dict[str, Study] = {
    "warmup": Study(
        "First-stage warm-up", "Does distilling stage 1 alone for the first 50 iterations help?",
        (Arm("warm-up 50", "toy-rmd"), Arm("no warm-up", "toy-rmd", overrides=_mc(warmup_iters=0))),
        "warm-up"),
    "gamma": Study(
        "Re-noising share gamma (Figure 8)", "How much of the predicted noise to keep at a resolution switch "
        "(training and sampling alike)?",
        tuple(Arm(f"gamma {g:g}", "toy-rmd", overrides=_mc(gamma=g)) for g in (0.0, 0.2, 0.5, 1.0)),
        "gamma"),
    "tau": Study(
        "Teacher time range", "Draw the matching time tau inside the stage's teacher-frame interval, or over the "
        "full range?",
        (Arm("tau in stage", "toy-rmd", overrides=_mc(tau_mode="stage")),
         Arm("tau full range", "toy-rmd", overrides=_mc(tau_mode="full"))),
        "tau"),
    "table3": Study(
        "Cross-resolution matching and the cascade (Table 3)", "What do cross-resolution matching and the cascade "
        "each contribute?",
        (Arm("RMD 2+2", "toy-rmd"),
         Arm("naive cascade (UP without RM)", "toy-naive"),
         Arm("2+2 cascade, no distillation", "toy-rmd", train=False),
         Arm("4-step DMD2 (no cascade)", "toy-dmd2")),
        "method"),
    "split": Study(
        "Steps per stage (Table 4)", "How many of the 4 steps should run at low resolution? (thresholds -6, -2.5, 0)",
        (Arm("1+3", "toy-rmd", schedule={"thresholds": [-6.0]}),
         Arm("2+2", "toy-rmd"),
         Arm("3+1", "toy-rmd", schedule={"thresholds": [0.0]}),
         Arm("2+2, 32 px from t = 0.75", "toy-rmd-early32")),
        "split"),
    "stages3": Study(
        "Three stages 8 -> 16 -> 32 px (Table 5)", "How to spread 4 steps over three resolutions? "
        "(thresholds (-6, -2.5), (-6, 0), (-2.5, 0))",
        (Arm("1+1+2", "toy-rmd-3stage", schedule={"thresholds": [-6.0, -2.5]}),
         Arm("1+2+1", "toy-rmd-3stage", schedule={"thresholds": [-6.0, 0.0]}),
         Arm("2+1+1", "toy-rmd-3stage", schedule={"thresholds": [-2.5, 0.0]}),
         # Table 3 on three stages: the 8 px teacher is the degraded one, so matching there is the naive risk
         Arm("1+1+2, naive cascade", "toy-naive", schedule={"resolutions": [8, 16, 32], "thresholds": [-6.0, -2.5]})),
        "split"),
}


def arm_config(arm: Arm, max_steps: Optional[int] = None, teacher: Optional[str] = None,
               extra: Optional[dict[str, Any]] = None):
    """The resolved, validated run config of an arm (a bad arm fails here, before any training).

    ``extra``: run-config keys applied to every arm under the arm's own changes (tests shrink runs with it).
    """
    from .distill.config import resolve
    from .recipes import load_recipe

    recipe = load_recipe(arm.recipe)
    if arm.schedule:
        schedule = recipe.schedule.model_validate({**recipe.schedule.model_dump(), **arm.schedule})
        recipe = recipe.model_copy(update={"schedule": schedule,
                                           "description": f"{recipe.description} [ablation: {arm.label}]"})
    overrides = {**(extra or {})}
    for k, v in arm.overrides.items():
        overrides[k] = {**overrides.get(k, {}), **v} if isinstance(v, dict) else v
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if teacher is not None:
        overrides["teacher"] = teacher
    return resolve(recipe, **overrides)


def run_key(cfg) -> str:
    """A folder name for a config: the recipe, then a digest of every setting that changes the numbers."""
    from .distill.config import LOGISTIC_KEYS

    data = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in LOGISTIC_KEYS | {"description"}}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.recipe}-{cfg.max_steps}-{digest}"


def untrained_method(name: str, cfg):
    """The arm's student at initialisation (zero LoRA = the teacher on the few-step plan)."""
    from .demo import _student_method

    return _student_method(name, cfg, None, None, "untrained", {})


def run_study(name: str, out: str, num_images: int = 256, seed: int = 0, max_steps: Optional[int] = None,
              rounds: int = 3, timing_batch: int = 32, progress: bool = True,
              teacher: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> list[dict]:
    """Train (or reuse), evaluate and time every arm of study ``name``; returns the rows (also written)."""
    from .demo import run_method, time_side_by_side, train_config
    from .toy.evaluate import Row, evaluate_rows, make_eval_set, write_grid
    from .toy.evaluator import load_evaluator

    study = STUDIES[name]
    configs = [arm_config(a, max_steps, teacher, overrides) for a in study.arms]  # every arm validated before any training
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    folders = [os.path.join(out, "runs", run_key(c)) for c in configs]
    methods = []
    for arm, cfg, folder in zip(study.arms, configs, folders):
        if arm.train:
            if progress:
                print(f"[{name}] {arm.label}: {folder}", file=sys.stderr)
            train_config(cfg, folder, progress)
            methods.append(run_method(arm.label, folder))
        else:
            methods.append(untrained_method(arm.label, cfg))

    eval_set = make_eval_set(num_images, seed)
    results, images = evaluate_rows([Row(m.name, m.generate, m.nfe) for m in methods], evaluator=load_evaluator(),
                                    eval_set=eval_set, return_images=True)
    speed = time_side_by_side(methods, eval_set.prompts[:timing_batch], eval_set.seeds[:timing_batch], rounds,
                              progress, warmup=False)
    base = speed[methods[0].name]
    rows = []
    for arm, cfg, folder, m, r in zip(study.arms, configs, folders, methods, results):
        rows.append({
            "label": arm.label, "recipe": arm.recipe, "schedule": cfg.schedule.model_dump(),
            "changes": {**{f"schedule.{k}": v for k, v in arm.schedule.items()}, **_flat(arm.overrides)},
            "plan": "+".join(str(len(s.steps)) for s in cfg.plan().stages),
            "alignment": r["alignment"], "alignment_se": r["alignment_se"], "fd": r["fd"], "detail": r["detail"],
            "degraded_rate": r["degraded_rate"], "per_attribute": r["per_attribute"], "nfe": m.nfe,
            "seconds_per_image": speed[m.name], "speedup_vs_first": base / speed[m.name],
            "run": folder if arm.train else None, "training": m.record,
        })
    info = {"study": name, "title": study.title, "question": study.question,
            "command": " ".join(["rmd"] + sys.argv[1:]) if sys.argv and "rmd" in sys.argv[0] else f"run_study({name!r})",
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "num_images": num_images, "seed": seed,
            "rounds": rounds, "timing_batch": timing_batch, "threads": torch.get_num_threads(),
            "wall_seconds": round(time.time() - t_start, 1)}
    _write_json(os.path.join(out, f"{name}.json"), {"info": info, "rows": rows})
    write_grid(os.path.join(out, f"{name}_samples.png"), {"real": eval_set.reference, **images})
    plot_study(rows, study, os.path.join(out, f"{name}.png"))
    _write_md(out, name, study, rows, info)
    return rows


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _write_json(path: str, data: Any) -> None:
    from .demo import write_json_strict

    write_json_strict(path, data)


def format_rows(rows: Sequence[dict]) -> str:
    head = f"{'arm':<32} {'plan':>6} {'align':>12} {'fd':>7} {'detail':>6} {'degr':>5} {'s/img':>8} {'speed':>6}"
    out = [head]
    for r in rows:
        out.append(f"{r['label']:<32} {r['plan']:>6} {r['alignment']:>6.3f}±{r['alignment_se']:.3f} {r['fd']:>7.1f} "
                   f"{r['detail']:>6.2f} {r['degraded_rate']:>5.2f} {r['seconds_per_image']:>8.4f} "
                   f"{r['speedup_vs_first']:>5.2f}x")
    return "\n".join(out)


def _write_md(out: str, name: str, study: Study, rows: Sequence[dict], info: dict) -> None:
    lines = [f"# {study.title}", "", study.question, "",
             f"Command: `{info['command']}`  ", f"Finished {info['finished']}; {info['num_images']} evaluation images "
             f"(seed {info['seed']}); timing: median of {info['rounds']} interleaved rounds of {info['timing_batch']} "
             f"images, {info['threads']} threads; {info['wall_seconds'] / 60:.1f} min in all.", "",
             "| arm | plan | alignment (± s.e.) | FD | detail | degraded | s/img | speed vs first |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['plan']} | {r['alignment']:.3f} ± {r['alignment_se']:.3f} | {r['fd']:.1f} | "
                     f"{r['detail']:.2f} | {r['degraded_rate']:.2f} | {r['seconds_per_image']:.4f} | "
                     f"{r['speedup_vs_first']:.2f}x |")
    lines += ["", "Per attribute:", "", "| arm | " + " | ".join(rows[0]["per_attribute"]) + " |",
              "|---|" + "---|" * len(rows[0]["per_attribute"])]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(f"{v:.2f}" for v in r["per_attribute"].values()) + " |")
    lines += ["", f"![{name}]({name}.png)", "", f"![samples]({name}_samples.png)", ""]
    tmp = os.path.join(out, f"{name}.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, os.path.join(out, f"{name}.md"))


def plot_study(rows: Sequence[dict], study: Study, path: str) -> None:
    """Four panels (alignment with its standard error, FD, detail, seconds per image) over the arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    panels = [("alignment", "alignment (higher is better)"), ("fd", "Frechet distance (lower is better)"),
              ("detail", "detail (1 = real)"), ("seconds_per_image", "seconds per image")]
    for ax, (key, title) in zip(axes, panels):
        vals = [r[key] if r[key] is not None and math.isfinite(r[key]) else float("nan") for r in rows]
        err = [r["alignment_se"] for r in rows] if key == "alignment" else None
        ax.bar(x, vals, yerr=err, color="#4c72b0", capsize=3)
        if key == "detail":
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(study.x_label, fontsize=8)
    fig.suptitle(study.title, fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_ablate_command(args: Any) -> None:
    from .cli import UserError

    if args.list or not args.study:
        for key, s in STUDIES.items():
            print(f"{key:8s} {s.title}: " + ", ".join(a.label for a in s.arms))
        return
    if args.study not in STUDIES:
        raise UserError(f"unknown study {args.study!r}; choose one of {', '.join(STUDIES)} (see `rmd ablate --list`)")
    if args.num_images < 2:
        raise UserError(f"--num-images must be at least 2 (the Frechet distance fits a covariance), got {args.num_images}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be a positive integer, got {args.max_steps}")
    if args.rounds < 1 or not 1 <= args.timing_batch <= args.num_images:
        raise UserError("--rounds must be at least 1 and --timing-batch between 1 and --num-images")
    from .distill.train import check_writable_folder

    check_writable_folder(args.out)
    rows = run_study(args.study, args.out, args.num_images, args.seed, args.max_steps, args.rounds,
                     args.timing_batch, progress=not args.quiet)
    print(format_rows(rows))
    print(f"written: {os.path.join(args.out, args.study)}.md, .json, .png")
