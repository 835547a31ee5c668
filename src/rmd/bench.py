"""``rmd bench``: sampling speed of the teacher, the N-step student and the cascades, side by side.

Every row samples the same batch with the same network (a distilled student is the teacher
network with a LoRA merged in, so it costs the same per call), in interleaved rounds whose
order rotates, so a slow moment of the machine is shared by all rows. Per row:

* ``seconds_per_image``: median over rounds of the round's time / batch size;
* ``speedup_vs_single_res``: the N-step full-resolution student's time / the row's;
* ``ideal_speedup``: the same ratio predicted from the measured cost of one network call
  at each resolution, ``sum_i c(res_i)`` over the steps (x2 for a guided pass), i.e. what
  the cascade would gain if the sampler cost nothing besides the network. The per-call
  costs are timed in every round, at a rotating place among the rows, so they see the same
  state of the machine as the rows they are compared with;
* ``efficiency`` = measured / ideal speedup;
* ``overhead``: share of the row's time spent outside the network calls (noise draws,
  re-noising, upsampling, guidance arithmetic) -- the sampler's own cost.

Text encoding and decoding are outside the timed region (the same for every row); the
pipeline-level time with both is what ``rmd demo`` reports.

Subjects: the shipped toy teacher (default; real prompts); a real model folder with its
recipe (``--recipe sdxl --model PATH``: the recipe's cascade, CFG scale and teacher steps, on
the GPU when there is one); or a tiny randomly initialised instance of a real diffusers class
(``--tiny sdxl|pixart|sd3|wan``; random conditioning) to check the machinery on each family.
On a GPU every timed region ends with ``torch.cuda.synchronize`` (kernels run asynchronously).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .denoisers import CFGDenoiser, Conditioning
from .plan import StagePlan, make_plan
from .sampler import sample

BENCH_FIELDS = ("name", "seconds_per_image", "speedup_vs_single_res", "ideal_speedup", "efficiency", "overhead")


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class TimedDenoiser(nn.Module):
    """Wraps a denoiser and adds the wall time spent inside its calls to ``self.seconds``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["inner"], name)

    def forward(self, *args: Any, **kwargs: Any):
        _sync()
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        _sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


@dataclass
class Subject:
    """What is benchmarked: a denoiser, a batch of conditioning, the empty prompt, and the settings."""

    name: str
    denoiser: nn.Module
    cond: Conditioning
    uncond: Conditioning
    guidance: float
    teacher_steps: int
    target: Any  # the full resolution: a pixel side, or "HxW"
    frames: Optional[int] = None
    cascades: tuple[tuple[str, StagePlan], ...] = ()


@dataclass
class Row:
    name: str
    plan: StagePlan
    guided: bool
    eta: float


def toy_subject(batch: int, teacher_steps: int = 50, teacher: Optional[str] = None) -> Subject:
    """The shipped toy teacher on ``batch`` evaluation prompts; cascades from the toy RMD recipes."""
    from .recipes import load_recipe
    from .toy.evaluate import make_eval_set
    from .toy.teacher import load_teacher

    t = load_teacher(teacher)
    prompts = make_eval_set(max(batch, 2), 0).prompts[:batch]
    cascades = []
    for recipe in ("toy-rmd", "toy-rmd-3stage"):
        plan = load_recipe(recipe).schedule.plan()
        cascades.append(("+".join(str(len(s.steps)) for s in plan.stages), plan))
    with torch.no_grad():
        cond, uncond = t.text.encode(prompts), t.text.encode([""])
    return Subject("toy", t.denoiser(), cond, uncond, t.config.guidance_scale, teacher_steps,
                   t.config.target_resolution, cascades=tuple(cascades))


def tiny_subject(family: str, batch: int, teacher_steps: int = 50) -> Subject:
    """A tiny random instance of a real diffusers class; a 2+2 cascade between its two smallest sizes."""
    from .tiny import tiny

    b = tiny(family)
    low, high = sorted(b.sizes)[:2]
    frames = b.frames[-1]
    cascade = make_plan(4, [low, high], [-2.5])
    return Subject(f"tiny-{family}", b.denoiser, b.make_cond(batch, 0), b.uncond, b.guidance, teacher_steps, high,
                   frames, cascades=(("2+2", cascade),))


DEFAULT_PROMPTS = ("a photo of a red fox in the snow", "a watercolor painting of a lighthouse at dusk",
                   "an astronaut riding a horse, digital art", "a bowl of ramen on a wooden table, studio light")


def recipe_subject(recipe_name: str, model: str, batch: int, teacher_steps: Optional[int] = None,
                   prompts: Optional[Sequence[str]] = None, device: Optional[str] = None,
                   dtype: Optional[str] = None) -> Subject:
    """A real model folder with its recipe: the recipe's cascade vs its teacher and the N-step student."""
    from .cli import UserError
    from .families import FAMILIES, denoiser_factory, encode_prompts, load_pipeline
    from .recipes import load_recipe

    recipe = load_recipe(recipe_name)
    if recipe.backbone not in FAMILIES:
        raise UserError(f"--recipe {recipe_name!r} is a {recipe.backbone!r} recipe; --model takes the real families "
                        f"({', '.join(FAMILIES)}); the toy is the default subject (no --recipe)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else None)
    pipe = load_pipeline(model, recipe.backbone, dtype=torch_dtype).to(device)
    den = denoiser_factory(pipe, recipe.backbone)()
    texts = list(prompts or DEFAULT_PROMPTS)
    texts = [texts[i % len(texts)] for i in range(batch)]
    cond = encode_prompts(pipe, recipe.backbone, texts).to(device)
    uncond = encode_prompts(pipe, recipe.backbone, [""]).to(device)
    plan = recipe.schedule.plan()
    name = "+".join(str(len(s.steps)) for s in plan.stages)
    return Subject(f"{recipe.name} ({model})", den, cond, uncond, recipe.teacher_guidance_scale,
                   teacher_steps or recipe.teacher_steps, recipe.schedule.resolutions[-1], recipe.frames,
                   cascades=((name, plan),))


def rows_for(subject: Subject, steps: int = 4) -> list[Row]:
    target = [subject.target]
    rows = [Row("teacher", make_plan(subject.teacher_steps, target), True, 1.0),
            Row(f"{steps}-step", make_plan(steps, target), False, 0.0)]
    rows += [Row(name, plan, False, 0.0) for name, plan in subject.cascades]
    return rows


def _call_inputs(subject: Subject, sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], tuple]:
    den, n = subject.denoiser, len(subject.cond)
    inputs = {}
    for size in sizes:
        shape = (n, *den.latent_shape(size, subject.frames))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(subject.cond.embeds.device)
        inputs[size] = (x, torch.full((n,), 0.5, device=x.device))
    return inputs


def _time_calls(subject: Subject, inputs: dict, reps: int, times: dict[tuple[int, int], list[float]]) -> None:
    """Append the seconds of ``reps`` unguided network calls on the whole batch at each size to ``times``."""
    for size, (x, t) in inputs.items():
        for _ in range(reps):
            _sync()
            start = time.perf_counter()
            subject.denoiser(x, t, subject.cond)
            _sync()
            times.setdefault(size, []).append(time.perf_counter() - start)


def ideal_seconds(row: Row, costs: dict[tuple[int, int], float]) -> float:
    """Network time the row would take if the sampler cost nothing: sum of per-call costs (x2 guided)."""
    per_call = 2.0 if row.guided else 1.0
    return per_call * sum(costs[step.size] for step in row.plan.steps)


def run_bench(subject: Subject, rows: Sequence[Row], rounds: int = 5, reps: int = 5,
              progress: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Measure every row side by side; returns (rows as dicts with BENCH_FIELDS + details, info).

    ``reps``: network calls timed at each resolution in each round, for the per-call costs.
    """
    timed = TimedDenoiser(subject.denoiser)
    seeds = list(range(len(subject.cond)))
    samplers = {}
    for row in rows:
        den = CFGDenoiser(timed, subject.uncond, subject.guidance) if row.guided else timed
        samplers[row.name] = (den, row)

    def run(name: str) -> None:
        den, row = samplers[name]
        sample(den, row.plan, subject.cond, seeds, eta=row.eta, gamma=1.0, num_frames=subject.frames)

    sizes = list(dict.fromkeys(step.size for r in rows for step in r.plan.steps))
    inputs = _call_inputs(subject, sizes)
    call_times: dict[tuple[int, int], list[float]] = {}
    calls_slot = object()  # the per-call costs take a turn in every round, so they drift with the rows
    with torch.no_grad():
        for row in rows:  # warm-up: allocator and kernel caches for every size
            run(row.name)
        totals: dict[str, list[float]] = {r.name: [] for r in rows}
        inside: dict[str, float] = {r.name: 0.0 for r in rows}
        names: list[Any] = [r.name for r in rows] + [calls_slot]
        for k in range(rounds):
            for name in names[k % len(names):] + names[: k % len(names)]:
                if name is calls_slot:
                    _time_calls(subject, inputs, reps, call_times)
                    continue
                timed.seconds = 0.0
                _sync()
                start = time.perf_counter()
                run(name)
                _sync()
                totals[name].append(time.perf_counter() - start)
                inside[name] += timed.seconds
            if progress:
                print(f"  bench round {k + 1}/{rounds}", file=sys.stderr)
    costs = {size: statistics.median(ts) for size, ts in call_times.items()}
    n = len(subject.cond)
    single = next(r for r in rows if not r.guided and len(r.plan.stages) == 1)
    single_s = statistics.median(totals[single.name]) / n
    single_ideal = ideal_seconds(single, costs)
    out = []
    for r in rows:
        s = statistics.median(totals[r.name]) / n
        ideal = single_ideal / ideal_seconds(r, costs)
        measured = single_s / s
        out.append({
            "name": r.name, "seconds_per_image": s, "speedup_vs_single_res": measured, "ideal_speedup": ideal,
            "efficiency": measured / ideal, "overhead": 1.0 - inside[r.name] / sum(totals[r.name]),
            "steps": [f"{st.size[0]}x{st.size[1]}" for st in r.plan.steps], "nfe": r.plan.num_steps * (2 if r.guided else 1),
            "speedup_vs_teacher": None,
        })
    teacher_s = next((o["seconds_per_image"] for o in out if o["name"] == "teacher"), None)
    for o in out:
        o["speedup_vs_teacher"] = teacher_s / o["seconds_per_image"] if teacher_s else None
    info = {"subject": subject.name, "batch": n, "rounds": rounds, "threads": torch.get_num_threads(),
            "call_seconds": {f"{h}x{w}": c for (h, w), c in costs.items()},
            "single_res_row": single.name, "guidance": subject.guidance, "torch": torch.__version__}
    return out, info


def format_rows(rows: Sequence[dict]) -> str:
    lines = [f"{'name':<10} {'s/img':>9} {'vs N-step':>9} {'ideal':>6} {'effic.':>6} {'overhead':>8} {'vs teacher':>10}"]
    for r in rows:
        lines.append(f"{r['name']:<10} {r['seconds_per_image']:>9.5f} {r['speedup_vs_single_res']:>8.2f}x "
                     f"{r['ideal_speedup']:>5.2f}x {r['efficiency']:>6.3f} {100 * r['overhead']:>7.2f}% "
                     + (f"{r['speedup_vs_teacher']:>9.1f}x" if r["speedup_vs_teacher"] else f"{'-':>10}"))
    return "\n".join(lines)


def run_bench_command(args: Any) -> None:
    from .cli import UserError

    if args.batch < 1 or args.rounds < 1 or (args.teacher_steps is not None and args.teacher_steps < 1):
        raise UserError("--batch, --rounds and --teacher-steps must be positive integers")
    if (args.recipe is None) != (args.model is None):
        raise UserError("give --recipe NAME and --model FOLDER together (a real model), or neither (the toy)")
    if args.tiny and args.model:
        raise UserError("--tiny and --model choose different subjects; give one of them")
    prompts = None
    if args.prompts:
        from .prompts import PromptFileError, read_prompt_file

        try:
            prompts = read_prompt_file(args.prompts).prompts
        except PromptFileError as e:
            raise UserError(f"--prompts: {e}") from None
    if args.out:
        from .distill.train import check_writable_folder

        if os.path.isdir(args.out):
            raise UserError(f"--out {args.out!r} is a folder; give a .json file path")
        check_writable_folder(os.path.dirname(os.path.abspath(args.out)), "--out's folder")
    if args.model:
        subject = recipe_subject(args.recipe, args.model, args.batch, args.teacher_steps, prompts, args.device,
                                 args.dtype)
    elif args.tiny:
        subject = tiny_subject(args.tiny, args.batch, args.teacher_steps or 50)
    else:
        subject = toy_subject(args.batch, args.teacher_steps or 50)
    rows, info = run_bench(subject, rows_for(subject), args.rounds, progress=not args.quiet and not args.json)
    info["command"] = " ".join(["rmd"] + sys.argv[1:]) if sys.argv and "rmd" in sys.argv[0] else "run_bench()"
    info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.out:
        from .demo import write_json_strict

        write_json_strict(args.out, {"info": info, "rows": rows})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{info['subject']}: batch {info['batch']}, median of {info['rounds']} interleaved rounds, "
              f"{info['threads']} threads")
        print(format_rows(rows))
