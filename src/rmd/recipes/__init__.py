"""Built-in recipes: validated YAML files, one per backbone and method.

A recipe is parsed into :class:`Recipe`; unknown keys and wrong types are errors
that name the key. Only the sections the engine uses so far are defined here;
each section validates itself.
"""

from __future__ import annotations

import os
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..plan import PlanError, StagePlan, make_plan

RECIPE_DIR = os.path.dirname(__file__)


class ScheduleConfig(BaseModel):
    """The stage plan (METHOD 3): N steps, resolutions low to high, one logSNR threshold per switch."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1)
    resolutions: list[Union[int, str]]
    thresholds: list[float] = []
    flow_shift: float = Field(1.0, gt=0)

    @field_validator("resolutions")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("give at least one resolution")
        return v

    def plan(self) -> StagePlan:
        return make_plan(self.steps, self.resolutions, self.thresholds, self.flow_shift)


class SamplingConfig(BaseModel):
    """Inference settings of the cascade (METHOD 4)."""

    model_config = ConfigDict(extra="forbid")

    guidance_scale: float = Field(1.0, ge=0)
    eta: float = Field(0.9, ge=0, le=1)
    gamma: float = Field(1.0, ge=0, le=1)
    upsample: Literal["bilinear", "bicubic", "nearest"] = "bilinear"


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    backbone: Literal["toy", "sdxl", "pixart-sigma", "sd3", "wan"]
    teacher_guidance_scale: float = Field(ge=0, description="CFG scale of the real score (teacher)")
    teacher_steps: int = Field(ge=1, description="the teacher's own sampling steps (for speed comparisons)")
    frames: Optional[int] = Field(None, ge=1, description="pixel frames, video backbones only")
    schedule: ScheduleConfig
    sampling: SamplingConfig = SamplingConfig()


def list_recipes() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))


def _format_validation(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; remove it or check its spelling")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid recipe {source}:\n" + "\n".join(lines)


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML file by path; errors name the bad key and the fix."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(RECIPE_DIR, f"{name_or_path}.yaml")
    if not os.path.exists(path):
        raise PlanError(f"no recipe {name_or_path!r}: not a file, and not one of the built-in recipes {list_recipes()}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise PlanError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PlanError(f"recipe {path} must be a YAML mapping of keys to values")
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        raise PlanError(_format_validation(e, path)) from None
    recipe.schedule.plan()  # an impossible schedule is an error now, not at step 1000
    return recipe
