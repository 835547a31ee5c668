"""Resolution trajectory division: stage plans (METHOD.md section 3).

A plan fixes, for each of the N student steps, its native time t, its
teacher-equivalent time (Eq. 2), its resolution and its stage, plus each stage's
interval on the teacher's time axis. Plans are validated on construction: a bad
plan raises :class:`PlanError` whose message names the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

from .schedules import logsnr_from_t, ratio_from_sizes, resolution_shift, t_from_logsnr, uniform_times

Size = tuple[int, int]
SizeLike = Union[int, Sequence[int], str]


class PlanError(ValueError):
    """A stage plan that cannot be run; the message says what to change."""


def parse_size(spec: SizeLike) -> Size:
    """``512`` / ``"512"`` -> (512, 512); ``"480x832"`` / ``(480, 832)`` -> (480, 832)."""
    if isinstance(spec, bool):
        raise PlanError(f"resolution {spec!r} is not a size; give a side like 512 or HxW like 480x832")
    if isinstance(spec, int):
        size = (spec, spec)
    elif isinstance(spec, str):
        s = spec.strip().lower()
        try:
            if "x" in s:
                h, w = s.split("x")
                size = (int(h), int(w))
            else:
                size = (int(s), int(s))
        except ValueError:
            raise PlanError(f"resolution {spec!r} is not a size; give a side like 512 or HxW like 480x832") from None
    else:
        vals = tuple(int(v) for v in spec)
        if len(vals) != 2:
            raise PlanError(f"resolution {spec!r} must have two entries (height, width)")
        size = vals  # type: ignore[assignment]
    if size[0] <= 0 or size[1] <= 0:
        raise PlanError(f"resolution {spec!r} must be positive")
    return size


def parse_sizes(spec: Union[str, Iterable[SizeLike]]) -> list[Size]:
    """``"512,1024"`` or ``"480x832,720x1248"`` or a list -> list of (H, W)."""
    if isinstance(spec, str):
        parts = [p for p in spec.split(",") if p.strip()]
    else:
        parts = list(spec)
    if not parts:
        raise PlanError("no resolutions given; pass e.g. --resolutions 512,1024")
    return [parse_size(p) for p in parts]


def parse_floats(spec: Union[str, Iterable[float], None], what: str = "thresholds",
                 example: str = "--thresholds=-6,-2.5") -> list[float]:
    """A comma-separated string or a sequence of numbers -> floats; ``what``/``example`` word the error."""
    if spec is None:
        return []
    if isinstance(spec, str):
        try:
            return [float(p) for p in spec.split(",") if p.strip()]
        except ValueError:
            raise PlanError(f"{what} {spec!r} must be comma-separated numbers, e.g. {example}") from None
    return [float(v) for v in spec]


@dataclass(frozen=True)
class PlanStep:
    index: int
    t: float  # native time at this step's resolution
    t_teacher: float  # the same state's time at the teacher resolution (Eq. 2)
    size: Size
    stage: int  # 0-based


@dataclass(frozen=True)
class PlanStage:
    size: Size
    t_hi: float  # teacher-frame interval [t_lo, t_hi]: t(lambda_{k-1}) ...
    t_lo: float  # ... down to t(lambda_k)
    steps: tuple[int, ...]


@dataclass(frozen=True)
class StagePlan:
    steps: tuple[PlanStep, ...]
    stages: tuple[PlanStage, ...]
    thresholds: tuple[float, ...] = ()
    flow_shift: float = 1.0
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def teacher_size(self) -> Size:
        return self.stages[-1].size

    @property
    def allocation(self) -> tuple[int, ...]:
        return tuple(len(s.steps) for s in self.stages)

    @property
    def label(self) -> str:
        return "+".join(str(n) for n in self.allocation)

    def times(self) -> list[float]:
        return [s.t for s in self.steps]

    def ideal_speedup(self) -> float:
        """Speedup over the same number of steps at the teacher resolution, cost ~ pixel count."""
        full = self.teacher_size[0] * self.teacher_size[1]
        cost = sum(s.size[0] * s.size[1] / full for s in self.steps)
        return self.num_steps / cost

    def to_dict(self) -> dict:
        return {
            "steps": [
                {
                    "index": s.index,
                    "t": s.t,
                    "t_teacher": s.t_teacher,
                    "resolution": s.size[0] if s.size[0] == s.size[1] else list(s.size),
                    "stage": s.stage,
                }
                for s in self.steps
            ],
            "stages": [
                {
                    "resolution": st.size[0] if st.size[0] == st.size[1] else list(st.size),
                    "t_hi": st.t_hi,
                    "t_lo": st.t_lo,
                    "steps": list(st.steps),
                }
                for st in self.stages
            ],
            "thresholds": list(self.thresholds),
            "flow_shift": self.flow_shift,
            "allocation": self.label,
            "ideal_speedup": self.ideal_speedup(),
        }

    def table(self) -> str:
        """A human-readable table (times shown x1000, as backbones take them)."""

        def fmt_size(sz: Size) -> str:
            return str(sz[0]) if sz[0] == sz[1] else f"{sz[0]}x{sz[1]}"

        lines = [f"plan {self.label}  flow_shift={self.flow_shift:g}  thresholds={list(self.thresholds)}  "
                 f"ideal speedup vs {self.num_steps} steps at {fmt_size(self.teacher_size)}: {self.ideal_speedup():.2f}x",
                 f"{'step':>4}  {'stage':>5}  {'resolution':>10}  {'t (native)':>10}  {'t (teacher)':>11}  {'logSNR@R':>8}"]
        for s in self.steps:
            lam = logsnr_from_t(s.t_teacher)
            lines.append(f"{s.index:>4}  {s.stage + 1:>5}  {fmt_size(s.size):>10}  {1000 * s.t:>10.1f}  "
                         f"{1000 * s.t_teacher:>11.1f}  {lam:>8.3f}")
        lines.append("stages (teacher-frame intervals):")
        for k, st in enumerate(self.stages):
            lines.append(f"  {k + 1}: {fmt_size(st.size):>10}  t in [{1000 * st.t_lo:.1f}, {1000 * st.t_hi:.1f}]  "
                         f"steps {list(st.steps)}")
        return "\n".join(lines)


def make_plan(
    steps: Optional[int],
    resolutions: Union[str, Iterable[SizeLike]],
    thresholds: Union[str, Iterable[float], None] = (),
    flow_shift: float = 1.0,
    times: Union[str, Sequence[float], None] = None,
) -> StagePlan:
    """Build and validate a stage plan.

    Steps are ``t_i = shift_s(1 - i/N)`` unless explicit native ``times`` are
    given (strictly decreasing, in (0, 1]). Step i in stage k stays there while
    ``lambda(t_i) - 2 log(r_{k+1} / r_k) < lambda_k`` (METHOD 3); otherwise it
    moves on, and the same test is applied for the next stage.
    """
    sizes = parse_sizes(resolutions)
    lams = parse_floats(thresholds)
    if flow_shift is None or not (flow_shift > 0) or math.isinf(flow_shift):
        raise PlanError(f"flow shift must be a positive number, got {flow_shift}; use 1 for no shift")
    if times is None:
        if steps is None or int(steps) != steps or steps < 1:
            raise PlanError(f"steps must be a positive integer, got {steps!r}")
        ts = uniform_times(int(steps), flow_shift)
    else:
        ts = parse_floats(times, "times", "--times 1,0.9,0.75,0.25")
        if steps is not None and steps != len(ts):
            raise PlanError(f"steps={steps} but {len(ts)} explicit times were given; drop one of them")
        if not ts:
            raise PlanError("explicit times list is empty")
        if any(not (0.0 < t <= 1.0) for t in ts):
            raise PlanError(f"explicit times must lie in (0, 1], got {ts}")
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise PlanError(f"explicit times must strictly decrease (noise to data), got {ts}")

    k_stages = len(sizes)
    for a, b in zip(sizes, sizes[1:]):
        if not (b[0] >= a[0] and b[1] >= a[1] and b[0] * b[1] > a[0] * a[1]):
            raise PlanError(
                f"resolutions must increase stage by stage (low to high), got {[_fmt(s) for s in sizes]}; "
                "list them from the first (lowest) stage to the teacher resolution"
            )
    if len(lams) != k_stages - 1:
        raise PlanError(
            f"{k_stages} resolution(s) need {k_stages - 1} logSNR threshold(s), got {len(lams)} ({lams}); "
            "pass one threshold per resolution switch, e.g. --thresholds=-2.5 for two stages"
        )
    if any(not math.isfinite(v) for v in lams):
        raise PlanError(f"thresholds must be finite numbers, got {lams}")
    if any(b <= a for a, b in zip(lams, lams[1:])):
        raise PlanError(f"thresholds must strictly increase (low logSNR first), got {lams}")

    stage_of: list[int] = []
    k = 0
    for t in ts:
        lam = logsnr_from_t(t)
        # ratio to the next stage: sqrt of the area ratio (METHOD 2)
        while k < k_stages - 1 and not (lam - 2.0 * math.log(ratio_from_sizes(sizes[k], sizes[k + 1])) < lams[k]):
            k += 1
        stage_of.append(k)

    counts = [stage_of.count(k) for k in range(k_stages)]
    if any(c == 0 for c in counts):
        empty = [i + 1 for i, c in enumerate(counts) if c == 0]
        raise PlanError(
            f"stage(s) {empty} get no step: allocation {'+'.join(map(str, counts))} for {len(ts)} steps, "
            f"resolutions {[_fmt(s) for s in sizes]}, thresholds {lams}, flow shift {flow_shift:g}; "
            "move the thresholds apart, add steps, or drop a resolution"
        )

    teacher = sizes[-1]
    plan_steps = tuple(
        PlanStep(
            index=i,
            t=t,
            t_teacher=float(resolution_shift(t, 1.0, ratio_from_sizes(sizes[k], teacher))),
            size=sizes[k],
            stage=k,
        )
        for i, (t, k) in enumerate(zip(ts, stage_of))
    )
    bounds = [-math.inf] + lams + [math.inf]
    stages = tuple(
        PlanStage(
            size=sizes[k],
            t_hi=float(t_from_logsnr(bounds[k])),
            t_lo=float(t_from_logsnr(bounds[k + 1])),
            steps=tuple(i for i, s in enumerate(stage_of) if s == k),
        )
        for k in range(k_stages)
    )
    return StagePlan(steps=plan_steps, stages=stages, thresholds=tuple(lams), flow_shift=float(flow_shift))


def _fmt(s: Size) -> str:
    return str(s[0]) if s[0] == s[1] else f"{s[0]}x{s[1]}"
