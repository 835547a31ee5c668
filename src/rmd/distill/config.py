"""The run config of a distillation: a recipe's ``distill:`` section, resolved and validated.

:class:`RunConfig` is flat and complete: every setting the trainer reads is explicit,
so the file written next to a run (``DIR/config.yaml``) and into every checkpoint
re-creates the run exactly (``rmd distill --config DIR/config.yaml``). Resolution order
for the method settings (:class:`rmd.distill.algorithm.MethodConfig`):

    MethodConfig defaults  <  PRESETS[method]  <  recipe-derived  <  ``distill.method_config``

where "recipe-derived" is the matching CFG scale (``teacher_guidance_scale``, METHOD 5:
the real score is the guided teacher) and the upsampling operator (``sampling.upsample``).
Unknown keys and wrong types are errors that name the key (:class:`rmd.plan.PlanError`).
"""

from __future__ import annotations

import os
from typing import Any, Literal, Mapping, Optional

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from ..plan import PlanError, StagePlan
from ..recipes import DistillConfig, Recipe, SamplingConfig, ScheduleConfig, _format_validation, load_recipe
from .algorithm import PRESETS, MethodConfig

# Settings that only say how long to run, how often to write, or how memory is laid out (FSDP,
# activation recomputation): a run may be resumed with other values. Everything else changes
# the numbers, so a resume refuses a mismatch.
LOGISTIC_KEYS = frozenset({"max_steps", "checkpoint_every", "keep_last", "sample_every", "num_sample_images",
                           "max_bad_steps", "sharding", "gradient_checkpointing"})


class RunConfig(DistillConfig):
    """Everything a distillation run reads; written next to the run and into each checkpoint."""

    model_config = ConfigDict(extra="forbid")

    recipe: str = Field(description="name of the recipe this run was resolved from")
    description: str = ""
    backbone: Literal["toy", "sdxl", "pixart-sigma", "sd3", "wan"]
    teacher_guidance_scale: float = Field(ge=0)
    teacher_steps: int = Field(ge=1)
    frames: Optional[int] = Field(None, ge=1)
    schedule: ScheduleConfig
    sampling: SamplingConfig = SamplingConfig()
    # resolved (no longer optional)
    teacher: str
    fake_lr: float = Field(gt=0)
    method_config: MethodConfig  # type: ignore[assignment]

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        plan = self.schedule.plan()  # PlanError (a ValueError) names the fix
        k = len(plan.stages)
        if self.stage_loss_weights is not None and len(self.stage_loss_weights) != k:
            raise ValueError(f"stage_loss_weights has {len(self.stage_loss_weights)} entries; the plan has {k} stages")
        sw = self.method_config.stage_weights
        if sw is not None and len(sw) != k:
            raise ValueError(f"method_config.stage_weights has {len(sw)} entries; the plan has {k} stages")
        return self

    def plan(self) -> StagePlan:
        return self.schedule.plan()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, recipe identity first (the order a reader wants)."""
        data = self.model_dump(mode="json")
        head = ["recipe", "description", "backbone", "teacher", "teacher_guidance_scale", "teacher_steps", "frames",
                "schedule", "sampling", "method", "method_config"]
        return {**{k: data[k] for k in head}, **{k: v for k, v in data.items() if k not in head}}


def _default_teacher(backbone: str) -> str:
    if backbone != "toy":
        raise PlanError(f"backbone {backbone!r} has no default teacher: give --model PATH (a local diffusers "
                        "pipeline folder) or set distill.teacher in the recipe")
    from ..toy.teacher import TEACHER_DIR

    return TEACHER_DIR


def resolve(recipe: Recipe, **overrides: Any) -> RunConfig:
    """A recipe (with or without a ``distill:`` section) + top-level overrides -> a complete RunConfig.

    ``overrides`` are RunConfig keys (e.g. ``max_steps=10``, ``teacher="..."``,
    ``method_config={"eta": 1.0}``); a ``method_config`` override is merged key by key.
    """
    section = recipe.distill or DistillConfig()
    data = section.model_dump(exclude={"method_config"})
    method_over = section.method_config.model_dump(exclude_unset=True)
    extra = dict(overrides)
    if isinstance(extra.get("method_config"), Mapping):
        method_over.update(extra.pop("method_config"))
    data.update(extra)
    method = data.get("method", "rmd")
    if method not in PRESETS:
        raise PlanError(f"method: unknown method {method!r}; choose one of {sorted(PRESETS)}")
    settings = {**PRESETS[method], "guidance_scale": recipe.teacher_guidance_scale,
                "upsample": recipe.sampling.upsample, **method_over}
    data.update(
        recipe=recipe.name,
        description=recipe.description,
        backbone=recipe.backbone,
        teacher_guidance_scale=recipe.teacher_guidance_scale,
        teacher_steps=recipe.teacher_steps,
        frames=recipe.frames,
        schedule=recipe.schedule.model_dump(),
        sampling=_sampling_for(recipe, settings),
        method_config=settings,
    )
    if data.get("teacher") is None:
        data["teacher"] = _default_teacher(recipe.backbone)
    data["teacher"] = os.path.abspath(os.path.expanduser(str(data["teacher"])))
    if data.get("prompts") is not None:
        data["prompts"] = os.path.abspath(os.path.expanduser(str(data["prompts"])))
    if data.get("fake_lr") is None and isinstance(data.get("generator_lr"), (int, float)):
        data["fake_lr"] = data["generator_lr"] * (5.0 if method == "tdm" else 1.0)  # TDM: fake lr 5x (METHOD 6)
    return _validate(data, f"recipe {recipe.name!r}")


def _sampling_for(recipe: Recipe, method: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's sampling settings; eta and gamma it leaves unset follow the training trajectory.

    A generator is trained on the states its own backward simulation produces (re-noising
    with the method's eta within a stage and gamma at a switch); sampling it with other
    values feeds it states it never saw. Measured on the toy: the teacher's 2+2 cascade at
    initialisation scores alignment 0.56 with the then training values (eta 0, gamma 0.2) and
    0.42 with eta 0.9, gamma 1.0. A recipe that sets eta or gamma keeps its value.
    """
    sampling = recipe.sampling.model_dump()
    for key in ("eta", "gamma"):
        if key not in recipe.sampling.model_fields_set:
            sampling[key] = method[key]
    return sampling


def _validate(data: Mapping[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig(**data)
    except ValidationError as e:
        raise PlanError(_format_validation(e, source).replace("invalid recipe", "invalid run config", 1)) from None


def load_run_config(name_or_path: str, **overrides: Any) -> RunConfig:
    """A built-in recipe name, a recipe YAML file, or a run's ``config.yaml`` -> RunConfig.

    A run config (it has a top-level ``recipe:`` key) is taken as is, with ``overrides``
    applied on top; a recipe is resolved with :func:`resolve`.
    """
    if os.path.isfile(name_or_path):
        with open(name_or_path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise PlanError(f"{name_or_path} is not valid YAML: {e}") from None
        if isinstance(data, dict) and "recipe" in data:
            method_over = overrides.pop("method_config", None)
            if method_over and isinstance(data.get("method_config"), dict):
                data["method_config"] = {**data["method_config"], **method_over}
            for key in ("teacher", "prompts"):
                if overrides.get(key) is not None:
                    overrides[key] = os.path.abspath(os.path.expanduser(str(overrides[key])))
            return _validate({**data, **overrides}, name_or_path)
    return resolve(load_recipe(name_or_path), **overrides)


def write_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


def config_differences(a: RunConfig, b: RunConfig, ignore: frozenset[str] = LOGISTIC_KEYS) -> list[str]:
    """Dotted keys whose values differ between two run configs (``ignore``: top-level keys to skip)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return sorted(k for k in fa.keys() | fb.keys() if k.split(".")[0] not in ignore and fa.get(k) != fb.get(k))
