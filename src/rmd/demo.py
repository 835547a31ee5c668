"""``rmd demo``: distil the shipped toy teacher with RMD 2+2 and compare it, in one run, with its neighbours.

What one run does (all on the CPU, all measured in this process):

1. distils the toy teacher with the ``toy-rmd`` recipe into ``DIR/rmd`` and with
   ``toy-rmd-early32`` (the same cost, 32 px entered at t = 0.75) into ``DIR/rmd-early32``
   (normal ``rmd distill`` run folders; a second ``rmd demo`` on the same folder resumes
   or reuses them);
2. loads the baselines: the 4-step full-resolution DMD2 student and the naive cascade,
   either shipped in the package (trained with the same generator updates and batch
   size, with their recipe and training record) or, with ``--train-baselines``,
   trained here into ``DIR/dmd2`` and ``DIR/naive``;
3. scores every method and the teacher (50 steps, CFG) on one evaluation set with the
   toy evaluator (:mod:`rmd.toy.evaluate`);
4. times them side by side: interleaved rounds in which every method generates the same
   batch in turn (the students in many rounds, the slow teacher in a few), and takes each
   method's median round (:func:`typical`);
5. writes ``DIR/report.json`` (rows: the evaluator's fields + ``method``, ``nfe``,
   ``seconds_per_image``, ``speedup_vs_teacher``, ``speedup_vs_4step``), ``DIR/report.md``
   (table, sample grid, speed-versus-quality plot ``DIR/speed_quality.png``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .toy.teacher import ASSET_DIR, TEACHER_DIR

STUDENTS_DIR = os.path.join(ASSET_DIR, "students")
SHIPPED_LORA = "generator_lora.safetensors"  # a shipped student's LoRA, beside its config.yaml and record.json
BASELINES = {"dmd2": "toy-dmd2", "naive": "toy-naive"}  # shipped student name -> recipe
# trained in the demo, row name -> recipe: the 2+2 plan the ablations vary, and the same cost with the
# 32 px stage entered at t = 0.75 (docs/RESULTS.md: level with DMD2 on alignment over five seeds)
RMD_RECIPES = {"rmd": "toy-rmd", "rmd-early32": "toy-rmd-early32"}
FOUR_STEP = "dmd2"  # the row the cascades' speed is compared with
# images per timing round: on a CPU, smaller batches at 8-16 px cost mostly per-call overhead
TIMING_BATCH = 128


def teacher_fingerprint(path: str = TEACHER_DIR) -> str:
    """sha256 of the teacher's transformer weights: a shipped student is valid only on this teacher."""
    h = hashlib.sha256()
    with open(os.path.join(path, "transformer", "diffusion_pytorch_model.safetensors"), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- students -------------------------------------------------------------------------------


@dataclass
class Method:
    """One compared method: its generator, network evaluations per image, and where it came from."""

    name: str
    method: str
    generate: Callable[[list[str], list[int]], torch.Tensor]
    nfe: float
    source: str  # "trained in this run", "shipped", "teacher"
    record: dict[str, Any]


def _student_method(name: str, run_cfg, lora_path: Optional[str], prefix: Optional[str], source: str,
                    record: dict[str, Any]) -> Method:
    """The run config's cascade with the generator LoRA at ``lora_path`` (None: the untrained, zero LoRA)."""
    from .distill.train import build_student, load_lora_weights, merged_copy
    from .sampler import sample_with

    student = build_student(run_cfg, torch.device("cpu"), synced=False)
    if lora_path is not None:
        load_lora_weights(student.base, "generator", lora_path, prefix=prefix)
    # deployed as a plain network with the LoRA merged in: timing it through peft's wrappers
    # (two adapters attached) would charge the student overhead the teacher does not pay
    bb = student.backbone
    den = from_model_like(merged_copy(student.base, "generator"))
    plan, smp = run_cfg.plan(), run_cfg.sampling
    per_step = 1 if smp.guidance_scale == 1.0 else 2
    uncond = bb.encode([""])  # once, outside the timed calls

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return sample_with(den, plan, smp, bb.encode, prompts, seeds, uncond=uncond, num_frames=run_cfg.frames,
                           decode=bb.decode)

    return Method(name, run_cfg.method, generate, float(plan.num_steps * per_step), source, record)


def from_model_like(model: torch.nn.Module):
    """The toy's denoiser adapter around a plain (merged) transformer: pixel space."""
    from .denoisers import from_model

    return from_model(model, vae_scale_factor=1)


def run_method(name: str, run_dir: str, teacher_dir: str = TEACHER_DIR) -> Method:
    """A method from a finished ``rmd distill`` run folder (its exported generator LoRA), or from a
    shipped student's folder (``config.yaml``, ``generator_lora.safetensors``, ``record.json``), which
    must have been trained on ``teacher_dir``; a run folder names its own teacher."""
    from .distill.config import load_run_config
    from .distill.sample_cli import generator_weights

    # a run folder always has metrics.jsonl and never a record.json; a shipped student the reverse
    if os.path.isfile(os.path.join(run_dir, "record.json")) and not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        return _shipped_folder(name, run_dir, teacher_dir,
                               retrain="pass the teacher it was trained on with --teacher, or retrain it with "
                                       "`rmd distill --recipe {recipe} --out DIR`")
    path, _ = generator_weights(run_dir, "final")  # a clear error if the run has not finished
    cfg = load_run_config(os.path.join(run_dir, "config.yaml"))
    return _student_method(name, cfg, path, "transformer", "trained in this run", summarise_run(run_dir, cfg))


_DEMO_FIX = "run `rmd demo --train-baselines` to train the baselines against this teacher"


def shipped_method(name: str, teacher_dir: str = TEACHER_DIR, students_dir: str = STUDENTS_DIR) -> Method:
    """A baseline student shipped in the package, checked against the shipped teacher."""
    return _shipped_folder(name, os.path.join(students_dir, name), teacher_dir, retrain=_DEMO_FIX)


def _shipped_folder(name: str, folder: str, teacher_dir: str, retrain: str) -> Method:
    """The student in a shipped-student folder, refused unless it was trained on ``teacher_dir``.

    ``retrain``: what the user should do when the folder is incomplete or of another teacher;
    ``{recipe}`` in it becomes the recipe the record names.
    """
    from .cli import UserError
    from .distill.config import load_run_config

    files = ("config.yaml", SHIPPED_LORA, "record.json")
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UserError(f"the student folder {folder} ({name}) is incomplete: it lacks {missing}; "
                        f"{retrain.format(recipe='NAME')}")
    with open(os.path.join(folder, "record.json"), encoding="utf-8") as f:
        record = json.load(f)
    if record.get("teacher_sha256") != teacher_fingerprint(teacher_dir):
        raise UserError(f"the student in {folder} ({name}) was trained on another toy teacher than {teacher_dir}; "
                        f"{retrain.format(recipe=record.get('recipe') or 'NAME')}")
    cfg = load_run_config(os.path.join(folder, "config.yaml"), teacher=teacher_dir)
    return _student_method(name, cfg, os.path.join(folder, SHIPPED_LORA), "transformer", "shipped", record)


def summarise_run(run_dir: str, cfg) -> dict[str, Any]:
    """The training record of a run folder (``cfg``: its loaded config): budget, wall time, last losses."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    tail = lines[-20:]
    return {
        "recipe": cfg.recipe,
        "method": cfg.method,
        "generator_updates": lines[-1]["step"] if lines else 0,
        "batch_size": cfg.batch_size,
        "train_seconds": round(sum(m["seconds"] for m in lines), 1),
        "loss_generator_last20": statistics.fmean(m["loss_generator"] for m in tail) if tail else None,
        "loss_fake_last20": statistics.fmean(m["loss_fake"] for m in tail) if tail else None,
    }


def ship_student(run_dir: str, name: str, command: str, dest_root: str = STUDENTS_DIR) -> str:
    """Copy a finished run's generator LoRA, config and record into the package's students folder.

    The record carries the fingerprint of the run's teacher, so a shipped student is
    refused if the shipped teacher is ever replaced without retraining it.
    """
    from .distill.config import load_run_config
    from .distill.sample_cli import generator_weights

    lora, _ = generator_weights(run_dir, "final")  # a clear error if the run has not finished
    cfg = load_run_config(os.path.join(run_dir, "config.yaml"))
    dest = os.path.join(dest_root, name)
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copy(lora, os.path.join(tmp, SHIPPED_LORA))
    shutil.copy(os.path.join(run_dir, "config.yaml"), os.path.join(tmp, "config.yaml"))
    record = {**summarise_run(run_dir, cfg), "command": command, "teacher_sha256": teacher_fingerprint(cfg.teacher)}
    with open(os.path.join(tmp, "record.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    old = dest + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dest):
        os.replace(dest, old)  # a crash from here on leaves either the old or the new student in place
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


# --- timing -----------------------------------------------------------------------------------


def typical(seconds: Sequence[float]) -> float:
    """The speed estimate of one method: the median of its timed rounds.

    Not the fastest round: on 2026-12-08 one round of the 4-step student ran at 8.1 ms per image
    against 10.8-13.2 ms in its other 14, and the ratio of fastest rounds put the three cascades
    (the same network calls) at 1.20-1.29x, where the ratio of medians gave 1.55-1.58x. A median
    over many rounds is moved by neither a lucky nor a slow round.
    """
    return statistics.median(seconds)


def time_side_by_side(methods: Sequence[Method], prompts: list[str], seeds: list[int], rounds: int = 3,
                      progress: bool = False, warmup: bool = True) -> dict[str, float]:
    """Each method's median seconds per image over :func:`time_rounds`."""
    return {name: typical(v) for name, v in time_rounds(methods, prompts, seeds, rounds, progress, warmup).items()}


def time_rounds(methods: Sequence[Method], prompts: list[str], seeds: list[int], rounds: int = 3,
                progress: bool = False, warmup: bool = True,
                teacher_rounds: Optional[int] = None) -> dict[str, list[float]]:
    """Seconds per image of each method in each of ``rounds`` interleaved rounds on the same batch.

    Interleaving spreads any slow phase of the machine over all methods instead of charging
    it to whichever ran then, and the order rotates each round (A B C, B C A, ...) so no
    method always follows the same one. ``teacher_rounds`` (default ``rounds``) caps the
    rounds of the teacher, whose one round costs as much as dozens of a student's. ``warmup``
    first runs every method once on the full batch, untimed (pass False when they have just
    run, e.g. right after evaluation).
    """
    if warmup:
        for m in methods:
            m.generate(prompts, seeds)
    limit = {m.name: teacher_rounds if m.method == "teacher" and teacher_rounds is not None else rounds
             for m in methods}
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    n = len(methods)
    total = max(limit.values())
    for r in range(total):
        for m in list(methods[r % n:]) + list(methods[: r % n]):
            if r >= limit[m.name]:
                continue
            start = time.perf_counter()
            m.generate(prompts, seeds)
            times[m.name].append((time.perf_counter() - start) / len(prompts))
        if progress:
            print(f"  timing round {r + 1}/{total} done", file=sys.stderr)
    return times


# --- report ------------------------------------------------------------------------------------


REPORT_FIELDS = ("name", "method", "alignment", "fd", "detail", "degraded_rate", "nfe", "seconds_per_image",
                 "speedup_vs_teacher", "speedup_vs_4step")


def build_rows(results: Sequence[dict], methods: Sequence[Method], per_round: dict[str, list[float]]) -> list[dict]:
    """Merge evaluator results with the side-by-side timing (:func:`time_rounds`) into report rows.

    Speeds are each method's median round (:func:`typical`); each row also keeps its round times,
    its fastest round and its speedup over the 4-step student within each round, so the report
    shows the timing spread.
    """
    speed = {name: typical(v) for name, v in per_round.items()}
    by_name = {m.name: m for m in methods}
    teacher_s = speed["teacher"]
    four_s = speed.get(FOUR_STEP)
    rows = []
    for r in results:
        m = by_name[r["name"]]
        s = speed[m.name]
        row = {
            "name": m.name,
            "method": m.method,
            "alignment": r["alignment"],
            "fd": r["fd"],
            "detail": r["detail"],
            "degraded_rate": r["degraded_rate"],
            "nfe": m.nfe,
            "seconds_per_image": s,
            "speedup_vs_teacher": teacher_s / s,
            "speedup_vs_4step": (four_s / s) if four_s else None,
            "alignment_se": r["alignment_se"],
            "alignment_heldout": r["alignment_heldout"],
            "per_attribute": r["per_attribute"],
            "num_images": r["num_images"],
            "eval_seconds_per_image": r["seconds_per_image"],
            "source": m.source,
            "training": m.record,
        }
        row["seconds_per_image_rounds"] = per_round[m.name]
        row["seconds_per_image_fastest"] = min(per_round[m.name])
        if FOUR_STEP in per_round:
            row["speedup_vs_4step_rounds"] = [f / t for f, t in zip(per_round[FOUR_STEP], per_round[m.name])]
        rows.append(row)
    return rows


def plot_speed_quality(rows: Sequence[dict], path: str) -> None:
    """Two panels: alignment and Frechet distance against images per second (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "alignment", "prompt alignment (higher is better)"),
                           (axes[1], "fd", "Frechet distance (lower is better)")):
        for r in rows:
            ax.scatter(1.0 / r["seconds_per_image"], r[key], s=40)
            ax.annotate(r["name"], (1.0 / r["seconds_per_image"], r[key]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("images per second (measured, same run)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def write_report_md(out: str, rows: Sequence[dict], info: dict[str, Any]) -> str:
    lines = ["# RMD demo report", "",
             f"Command: `{info['command']}`  ", f"Finished: {info['finished']}; {info['num_images']} evaluation images, "
             f"timing: median of {info['rounds']} interleaved rounds of {info['timing_batch']} images "
             f"(the teacher: of {info['teacher_rounds']}), "
             f"{info['threads']} threads.", "",
             "| name | method | alignment | FD | detail | degraded | NFE | s/img | speedup vs teacher | "
             "speedup vs 4-step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs4 = "-" if r["speedup_vs_4step"] is None else f"{r['speedup_vs_4step']:.2f}x"
        lines.append(f"| {r['name']} | {r['method']} | {r['alignment']:.3f} ± {r['alignment_se']:.3f} | {r['fd']:.1f} | "
                     f"{r['detail']:.2f} | "
                     f"{r['degraded_rate']:.2f} | {r['nfe']:g} | {r['seconds_per_image']:.4f} | "
                     f"{r['speedup_vs_teacher']:.1f}x | {vs4} |")
    lines += ["", "Alignment: share of prompt attributes the toy evaluator reads back (± its standard error over "
              "images). FD: Frechet distance of "
              "evaluator features to real renders of the same prompts. Detail: high-frequency energy relative to "
              "real images (1 = real; below: blur). Degraded: share of samples that look like the degraded "
              "low-resolution training data.", ""]
    spread = [f"{r['name']} {min(r['speedup_vs_4step_rounds']):.2f}-{max(r['speedup_vs_4step_rounds']):.2f}x"
              for r in rows if r.get("speedup_vs_4step_rounds") and r["name"] not in (FOUR_STEP, "teacher")]
    if spread:
        lines += ["Speedup vs 4-step within each timing round (lowest-highest; the table gives the ratio of the "
                  "medians): " + "; ".join(spread) + ".", ""]
    lines += ["![samples](samples.png)", "", "![speed versus quality](speed_quality.png)", "", "## Training", ""]
    if info["budget_notes"]:
        lines += ["**Unequal training budgets** (the comparison is not like for like): "
                  + "; ".join(info["budget_notes"]), ""]
    for r in rows:
        t = r["training"]
        if t:
            lines.append(f"- **{r['name']}** ({r['source']}): recipe `{t.get('recipe')}`, "
                         f"{t.get('generator_updates')} generator updates at batch {t.get('batch_size')}, "
                         f"{t.get('train_seconds', 0) / 60:.1f} min of training")
    path = os.path.join(out, "report.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


# --- the command --------------------------------------------------------------------------------


def _train(recipe: str, out: str, overrides: dict[str, Any], progress: bool) -> None:
    from .distill.config import load_run_config

    train_config(load_run_config(recipe, **overrides), out, progress)


def train_config(cfg, out: str, progress: bool) -> None:
    """Train ``cfg`` into ``out``: resume an unfinished run, reuse a finished one only if its settings are equal."""
    from .distill.config import load_run_config
    from .distill.train import train

    info_path = os.path.join(out, "run.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("status") == "finished" and info.get("step", 0) >= cfg.max_steps:
            from .cli import UserError
            from .distill.config import config_differences

            diff = config_differences(load_run_config(os.path.join(out, "config.yaml")), cfg)
            if diff:
                raise UserError(f"{out} holds a finished run with other settings ({diff}); "
                                "choose another --out or delete it")
            print(f"{out}: already trained to step {info['step']}, reusing it", file=sys.stderr)
            return
    train(cfg, out, resume=True, progress=progress)


def run_demo(out: str, num_images: int = 128, seed: int = 0, max_steps: Optional[int] = None,
             train_baselines: bool = False, rounds: int = 15, teacher_rounds: int = 3, timing_batch: Optional[int] = None, teacher_steps: int = 50,
             progress: bool = True, teacher: str = TEACHER_DIR, students_dir: str = STUDENTS_DIR,
             overrides: Optional[dict[str, Any]] = None) -> list[dict]:
    """The whole demo; returns the report rows (also written to ``out/report.json``).

    ``overrides`` are run-config keys applied to every distillation here (tests shrink
    the runs with them); ``teacher`` and ``students_dir`` replace the shipped ones.
    """
    from .toy.evaluate import Row, evaluate_rows, make_eval_set, teacher_generator, write_grid
    from .toy.evaluator import load_evaluator
    from .toy.teacher import load_teacher

    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    timing_batch = min(TIMING_BATCH, num_images) if timing_batch is None else timing_batch
    overrides = {**(overrides or {}), "teacher": teacher}
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    baselines = {}
    if not train_baselines:  # check the shipped students before minutes of training, not after
        baselines = {name: shipped_method(name, teacher, students_dir) for name in BASELINES}
    for name, recipe in RMD_RECIPES.items():
        _train(recipe, os.path.join(out, name), overrides, progress)
    methods = []
    gen, nfe = teacher_generator(load_teacher(teacher), teacher_steps)
    methods.append(Method("teacher", "teacher", gen, nfe, "teacher", {}))
    for name, recipe in BASELINES.items():
        if train_baselines:
            _train(recipe, os.path.join(out, name), overrides, progress)
            methods.append(run_method(name, os.path.join(out, name)))
        else:
            methods.append(baselines[name])
    methods += [run_method(name, os.path.join(out, name)) for name in RMD_RECIPES]

    eval_set = make_eval_set(num_images, seed)
    results, images = evaluate_rows([Row(m.name, m.generate, m.nfe) for m in methods], evaluator=load_evaluator(),
                                    eval_set=eval_set, return_images=True)
    teacher_rounds = min(teacher_rounds, rounds)
    per_round = time_rounds(methods, eval_set.prompts[:timing_batch], eval_set.seeds[:timing_batch], rounds,
                            progress, warmup=False,  # evaluation has just run every method
                            teacher_rounds=teacher_rounds)
    rows = build_rows(results, methods, per_round)
    # the comparison is fair only at equal budgets (generator updates x batch size): say so if not
    rmd_rec = next(m.record for m in methods if m.name == "rmd")
    budget_notes = [f"{m.name}: {m.record.get('generator_updates')} updates at batch {m.record.get('batch_size')} vs "
                    f"RMD's {rmd_rec['generator_updates']} at {rmd_rec['batch_size']}"
                    for m in methods if m.record and m.name not in RMD_RECIPES
                    and (m.record.get("generator_updates"), m.record.get("batch_size"))
                    != (rmd_rec["generator_updates"], rmd_rec["batch_size"])]
    write_grid(os.path.join(out, "samples.png"), {"real": eval_set.reference, **images})
    plot_speed_quality(rows, os.path.join(out, "speed_quality.png"))
    info = {"command": " ".join(["rmd"] + sys.argv[1:]) if sys.argv and "rmd" in sys.argv[0] else "run_demo()",
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "num_images": num_images, "rounds": rounds,
            "teacher_rounds": teacher_rounds,
            "timing_batch": timing_batch, "threads": torch.get_num_threads(),
            "wall_seconds": round(time.time() - t_start, 1), "budget_notes": budget_notes}
    write_json_strict(os.path.join(out, "report.json"), rows)
    write_report_md(out, rows, info)
    return rows


def write_json_strict(path: str, data: Any) -> None:
    """Write strict JSON atomically: a diverged (non-finite) metric becomes null, never NaN."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(data), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def format_rows(rows: Sequence[dict]) -> str:
    head = f"{'name':<10} {'align':>6} {'fd':>8} {'detail':>6} {'degr':>5} {'nfe':>4} {'s/img':>8} {'vs teacher':>10} " \
           f"{'vs 4-step':>9}"
    out = [head]
    for r in rows:
        vs4 = "-" if r["speedup_vs_4step"] is None else f"{r['speedup_vs_4step']:.2f}x"
        out.append(f"{r['name']:<10} {r['alignment']:>6.3f} {r['fd']:>8.1f} {r['detail']:>6.2f} "
                   f"{r['degraded_rate']:>5.2f} {r['nfe']:>4g} {r['seconds_per_image']:>8.4f} "
                   f"{r['speedup_vs_teacher']:>9.1f}x {vs4:>9}")
    return "\n".join(out)


def run_demo_command(args: Any) -> None:
    from .cli import UserError

    if args.num_images < 2:
        raise UserError(f"--num-images must be at least 2 (the Frechet distance fits a covariance), got {args.num_images}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be a positive integer, got {args.max_steps}")
    if args.rounds < 1 or args.teacher_rounds < 1:
        raise UserError(f"--rounds and --teacher-rounds must be at least 1, got {args.rounds} and {args.teacher_rounds}")
    if args.timing_batch is not None and not 1 <= args.timing_batch <= args.num_images:
        raise UserError(f"--timing-batch must be between 1 and --num-images ({args.num_images})")
    from .distill.train import check_writable_folder

    check_writable_folder(args.out)
    rows = run_demo(args.out, args.num_images, args.seed, args.max_steps, args.train_baselines, args.rounds,
                    args.teacher_rounds, args.timing_batch, progress=not args.quiet)
    print(format_rows(rows))
    print(f"report: {os.path.join(args.out, 'report.md')} and report.json")
