"""The ``rmd`` command line.

User mistakes (bad plans, bad files, bad options) end with a one-paragraph
message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


class UserError(Exception):
    """A mistake in what the user asked for; printed without a traceback."""


def _lazy(module: str, function: str):
    """A command that imports ``rmd.<module>`` only when it runs (``rmd --help`` stays fast)."""

    def run(args: argparse.Namespace) -> None:
        import importlib

        getattr(importlib.import_module(f"{__package__}.{module}"), function)(args)

    return run


def _cmd_schedule(args: argparse.Namespace) -> None:
    from .plan import make_plan
    from .recipes import load_recipe

    if args.recipe:
        recipe = load_recipe(args.recipe)
        sched = recipe.schedule
        steps = args.steps or (None if args.times is not None else sched.steps)  # --times sets its own count
        resolutions = args.resolutions or sched.resolutions
        thresholds = args.thresholds if args.thresholds is not None else sched.thresholds
        shift = args.flow_shift if args.flow_shift is not None else sched.flow_shift
        # the recipe's explicit times hold for its own step count and shift only
        times = args.times if args.times is not None else (
            sched.times if args.steps is None and args.flow_shift is None else None)
    else:
        if (args.steps is None and args.times is None) or args.resolutions is None:
            raise UserError("give --steps (or --times) and --resolutions (e.g. --steps 4 --resolutions 512,1024 "
                            "--thresholds=-2.5), or --recipe NAME (see `rmd recipes`)")
        steps, resolutions = args.steps, args.resolutions
        thresholds = args.thresholds or ""
        shift = args.flow_shift if args.flow_shift is not None else 1.0
        times = args.times
    plan = make_plan(steps, resolutions, thresholds, flow_shift=shift, times=times)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(plan.table())


def _cmd_recipes(args: argparse.Namespace) -> None:
    from .recipes import list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        print(f"{name:16s} {r.description}")


def _cmd_toy_train_teacher(args: argparse.Namespace) -> None:
    from .toy.teacher import TeacherConfig, train_teacher

    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.warmup is not None:
        overrides["warmup"] = args.warmup
    if args.context_tokens is not None:
        overrides["context_tokens"] = args.context_tokens or None
    if args.compile:
        overrides["compile"] = True
    if args.bf16_at:
        try:
            overrides["bf16_resolutions"] = tuple(int(r) for r in args.bf16_at.split(","))
        except ValueError:
            raise UserError(f"--bf16-at takes resolutions separated by commas, e.g. 32 or 16,32; got {args.bf16_at!r}")
    try:
        cfg = TeacherConfig(**overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    record = train_teacher(cfg, args.out, resume=not args.restart, init_from=args.init_from)
    print(f"trained {cfg.steps} steps in {record['wall_seconds'] / 60:.1f} min; "
          f"final loss {record['loss_curve'][-1]['loss']:.4f}; model written to {args.out}")


def _cmd_toy_train_evaluator(args: argparse.Namespace) -> None:
    from .toy.evaluator import EvaluatorConfig, train_evaluator

    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    train_evaluator(EvaluatorConfig(**overrides), args.out, command=" ".join(["rmd"] + sys.argv[1:]))
    print(f"evaluator written to {args.out}")


def _cmd_ship_student(args: argparse.Namespace) -> None:
    from .demo import ship_student

    dest = ship_student(args.run, args.name, command=args.command_line or f"rmd distill --out {args.run}")
    print(f"shipped {args.run} as {dest}")


def _add_distill_parsers(sub) -> None:
    d = sub.add_parser("distill", help="distil a teacher into a few-step cascaded generator (RMD, DMD2, TDM, naive)")
    d.add_argument("--recipe", help="a built-in recipe with a distill section (see `rmd recipes`), e.g. toy-rmd")
    d.add_argument("--config", help="a recipe YAML file, or a run's config.yaml")
    d.add_argument("--out", required=True, help="run folder (metrics.jsonl, checkpoints/, export/, ...)")
    d.add_argument("--max-steps", type=int, help="generator updates in total (overrides the config)")
    d.add_argument("--checkpoint-every", type=int, help="write a checkpoint every K iterations")
    d.add_argument("--model", "--teacher", dest="teacher",
                   help="teacher model folder: a local diffusers pipeline folder for sdxl / pixart-sigma / sd35-medium "
                        "/ wan21-* recipes (default for toy recipes: the shipped toy teacher)")
    d.add_argument("--prompts", help="prompt file to distil from (.txt one per line, .jsonl, .csv); real backbones")
    d.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    d.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out (its checkpoints, metrics, exports) and start again")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config value, e.g. --set method_config.gamma=0.5 --set batch_size=4 (repeatable)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_lazy("distill.train", "run_distill_command"))

    s = sub.add_parser("sample", help="sample a distilled generator from a run folder")
    s.add_argument("--run", required=True, help="a run folder written by `rmd distill`")
    s.add_argument("--prompt", default=None, help="one prompt (see also --prompts)")
    s.add_argument("--prompts", default=None, help="a prompt file: .txt (one per line), .jsonl ({\"prompt\", "
                                                   "\"seed\"}) or .csv (prompt[,seed] columns)")
    s.add_argument("--out", required=True, help="output PNG with --prompt (a grid when --num-images > 1); a "
                                                "folder with --prompts (NNNNNN.png + NNNNNN.json per prompt)")
    s.add_argument("--batch-size", type=int, default=16, help="images per sampler call with --prompts")
    s.add_argument("--overwrite", action="store_true", help="with --prompts: replace samples already in --out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-images", type=int, default=1, help="images with seeds S, S+1, ...")
    s.add_argument("--checkpoint", default=None,
                   help="final (the export), latest (newest checkpoint) or a step number; default final if exported")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.set_defaults(func=_lazy("distill.sample_cli", "run_sample_command"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmd", description="Cross-Resolution Distribution Matching Distillation")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("schedule", help="print a stage plan (steps, times, resolutions, stages)")
    s.add_argument("--recipe", help="take the schedule from a recipe (see `rmd recipes`); other flags override it")
    s.add_argument("--steps", type=int, help="number of student steps N")
    s.add_argument("--resolutions", help="comma-separated, low to high: 512,1024 or 480x832,720x1248")
    s.add_argument("--thresholds", help="comma-separated logSNR thresholds, one per switch: --thresholds=-2.5")
    s.add_argument("--flow-shift", type=float, help="SD3-style flow shift of the step times (default 1)")
    s.add_argument("--times", help="explicit native step times, decreasing in (0, 1]: "
                   "--times 1,0.9,0.75,0.25 (replaces the uniform times and the flow shift)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_cmd_schedule)

    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.set_defaults(func=_cmd_recipes)

    toy = sub.add_parser("toy", help="the embedded toy world: teacher training and evaluation")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    t = toy_sub.add_parser("train-teacher", help="train the toy SD3-class teacher from scratch (CPU, reproducible)")
    t.add_argument("--out", required=True, help="output folder (a diffusers-style model folder)")
    t.add_argument("--steps", type=int, help="training steps (default 25000, the shipped teacher's; about 104 min "
                                             "on 2 cores of a slow day, 72 min for 15000)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out and start again")
    t.add_argument("--init-from", help="start from the weights of this teacher folder (a further training phase)")
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup", type=int)
    t.add_argument("--context-tokens", type=int,
                   help="context tokens a prompt is compressed to (default 2; 0 feeds one token per word)")
    t.add_argument("--compile", action="store_true", help="torch.compile the transformer (3.5 min of compiling; "
                   "with --bf16-at 32 no faster per step on the 2-core CPU, docs/RESULTS.md; another rounding, so "
                   "another teacher than the shipped one)")
    t.add_argument("--bf16-at", metavar="RES[,RES]", help="train these resolutions under bf16 autocast, e.g. 32")
    t.set_defaults(func=_cmd_toy_train_teacher)

    te = toy_sub.add_parser("train-evaluator", help="train the toy evaluator (attribute read-back network)")
    te.add_argument("--out", required=True)
    te.add_argument("--steps", type=int)
    te.add_argument("--seed", type=int)
    te.set_defaults(func=_cmd_toy_train_evaluator)

    e = toy_sub.add_parser("eval", help="evaluate the standard rows (real, teacher, teacher-low) with the toy evaluator")
    e.add_argument("--num-images", type=int, default=256)
    e.add_argument("--steps", type=int, default=50, help="teacher sampling steps")
    e.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: the teacher's own)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--rows", default="real,teacher,teacher-low", help="comma-separated rows to evaluate; also real-blur and real-noise, "
                   "barely visible perturbations of the real renders that give FD a scale")
    e.add_argument("--teacher", default=None, help="toy teacher folder (default: the shipped one)")
    e.add_argument("--json", action="store_true", help="print the rows as JSON")
    e.add_argument("--fd-bootstrap", type=int, default=0, metavar="ROUNDS",
                   help="add fd_se and the paired FD difference to every other row (fd_diff), from this many "
                        "bootstrap rounds over the evaluation images")
    e.add_argument("--grid", default=None, help="write a PNG grid of the samples of each row here")
    e.add_argument("--run", action="append", metavar="NAME=DIR",
                   help="also evaluate the generator of a finished `rmd distill` folder, or of a shipped student's "
                        "folder (src/rmd/assets/toy/students/dmd2), as row NAME (repeatable)")
    e.set_defaults(func=_lazy("toy.evaluate", "run_eval_command"))

    _add_distill_parsers(sub)
    from .evaluation.command import add_eval_parser  # rmd eval (light: imports torch only when it runs)
    add_eval_parser(sub)

    dm = sub.add_parser("demo", help="distil the toy teacher with RMD 2+2 and compare it with DMD2, the naive "
                                     "cascade and the teacher (report.json, report.md, plot)")
    dm.add_argument("--out", default="rmd-demo", help="output folder (default: ./rmd-demo)")
    dm.add_argument("--num-images", type=int, default=128, help="evaluation images per method")
    dm.add_argument("--seed", type=int, default=0, help="evaluation set seed")
    dm.add_argument("--max-steps", type=int, default=None, help="generator updates (default: the recipe's)")
    dm.add_argument("--train-baselines", action="store_true",
                    help="train the DMD2 and naive baselines here instead of using the shipped ones (slow)")
    dm.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds of the students (each "
                    "method's median round is its speed)")
    dm.add_argument("--teacher-rounds", type=int, default=3, help="timing rounds of the teacher (at most --rounds)")
    dm.add_argument("--timing-batch", type=int, default=None,
                    help="images per method and timing round (default: 128, or --num-images if fewer; on a CPU, "
                         "small batches at 8-16 px cost mostly per-call overhead, docs/RESULTS.md)")
    dm.add_argument("--quiet", action="store_true", help="no progress bars")
    dm.set_defaults(func=_lazy("demo", "run_demo_command"))

    ab = sub.add_parser("ablate", help="reproduce one of the paper's ablations on the toy (train, evaluate, time; "
                                       "table and plot)")
    ab.add_argument("study", nargs="?", help="warmup, gamma, tau, table3, split or stages3 (see --list)")
    ab.add_argument("--list", action="store_true", help="list the studies and their arms")
    ab.add_argument("--out", default="rmd-ablations", help="output folder, shared by all studies (default: "
                                                          "./rmd-ablations)")
    ab.add_argument("--num-images", type=int, default=256, help="evaluation images per arm")
    ab.add_argument("--seed", type=int, default=0, help="evaluation set seed")
    ab.add_argument("--max-steps", type=int, default=None, help="generator updates (default: the recipes')")
    ab.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ab.add_argument("--timing-batch", type=int, default=32, help="images per arm and timing round")
    ab.add_argument("--quiet", action="store_true", help="no progress bars")
    ab.set_defaults(func=_lazy("ablate", "run_ablate_command"))

    pl = sub.add_parser("plan", help="FLOPs per step, predicted speedups and training memory of a recipe, from its "
                                     "public backbone config (no weights)")
    pl.add_argument("--recipe", required=True, help="a recipe with an architecture section (sdxl, pixart-sigma, "
                                                    "sd35-medium, wan21-14b, wan21-1.3b)")
    pl.add_argument("--lora-rank", type=int, default=None, help="LoRA rank per role (default: the recipe's, else 64)")
    pl.add_argument("--batch", type=int, default=2, help="batch size for the activation estimate")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_lazy("planner", "run_plan_command"))

    bn = sub.add_parser("bench", help="time the teacher, the N-step student and the cascades side by side "
                                      "(speedups, ideal speedups, efficiency, sampler overhead)")
    bn.add_argument("--tiny", choices=["sdxl", "pixart", "sd3", "wan"], default=None,
                    help="benchmark a tiny random instance of this diffusers family instead of the toy teacher")
    bn.add_argument("--batch", type=int, default=128, help="images per sampler call (default 128)")
    bn.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    bn.add_argument("--recipe", default=None, help="with --model: a real recipe (name or YAML); its plan is the "
                                                 "cascade, its CFG scale and teacher steps the teacher row's")
    bn.add_argument("--model", default=None, help="with --recipe: a local diffusers pipeline folder of the family")
    bn.add_argument("--prompts", default=None, help="with --model: prompt file for the batch (default: built-in)")
    bn.add_argument("--device", default=None, help="with --model: default cuda if available, else cpu")
    bn.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="with --model: network dtype (default bfloat16 on cuda, float32 on cpu)")
    bn.add_argument("--teacher-steps", type=int, default=None,
                    help="teacher sampling steps (guided); default the recipe's, 50 for the toy")
    bn.add_argument("--out", default=None, help="also write the rows and the settings to this JSON file")
    bn.add_argument("--json", action="store_true", help="print the rows as JSON")
    bn.add_argument("--quiet", action="store_true")
    bn.set_defaults(func=_lazy("bench", "run_bench_command"))

    ss = toy_sub.add_parser("ship-student", help="(maintainers) copy a finished toy run into the package as a "
                                                 "shipped demo baseline")
    ss.add_argument("--run", required=True)
    ss.add_argument("--name", required=True, choices=["dmd2", "naive"])
    ss.add_argument("--command-line", default=None, help="the command that trained the run (for the record)")
    ss.set_defaults(func=_cmd_ship_student)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .plan import PlanError

    parser = build_parser()
    args = parser.parse_args(argv)
    # the libraries' own bars (loading and writing weights) would bury ours and the error messages;
    # set before any of them is imported (the commands import them lazily)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        args.func(args)
    except (UserError, PlanError) as err:
        print(f"rmd {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
