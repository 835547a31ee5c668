"""Built-in recipes: validated YAML files, one per backbone and method.

A recipe is parsed into :class:`Recipe`; unknown keys and wrong types are errors
that name the key. Only the sections the engine uses so far are defined here;
each section validates itself. The optional ``distill:`` section
(:class:`DistillConfig`) says how to distil the recipe's teacher; the trainer
resolves it into a complete :class:`rmd.distill.config.RunConfig`.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from ..distill.algorithm import MethodConfig
from ..plan import PlanError, StagePlan, make_plan

RECIPE_DIR = os.path.dirname(__file__)


class ScheduleConfig(BaseModel):
    """The stage plan (METHOD 3): N steps, resolutions low to high, one logSNR threshold per switch."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1)
    resolutions: list[Union[int, str]]
    thresholds: list[float] = []
    flow_shift: float = Field(1.0, gt=0)
    times: Optional[list[float]] = Field(
        None, description="explicit native step times in (0, 1], strictly decreasing, one per step "
        "(replaces the uniform times and flow_shift; rmd.plan.make_plan)")

    @field_validator("resolutions")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("give at least one resolution")
        return v

    def plan(self) -> StagePlan:
        return make_plan(self.steps, self.resolutions, self.thresholds, self.flow_shift, times=self.times)


class SamplingConfig(BaseModel):
    """Inference settings of the cascade (METHOD 4)."""

    model_config = ConfigDict(extra="forbid")

    guidance_scale: float = Field(1.0, ge=0)
    eta: float = Field(0.9, ge=0, le=1)
    gamma: float = Field(1.0, ge=0, le=1)
    upsample: Literal["bilinear", "bicubic", "nearest"] = "bilinear"


def _overrides_of(model: type[BaseModel], name: str) -> type[BaseModel]:
    """A model with the same fields, types and bounds as ``model`` but nothing required.

    Only the keys a recipe sets are overrides (``model_dump(exclude_unset=True)``), so an
    explicit ``null`` (e.g. ``snr_clip: null``, "no clip") differs from "not given".
    """
    fields: dict[str, Any] = {}
    for key, f in model.model_fields.items():
        typ = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[key] = (typ, Field(None, description=f.description))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


MethodOverrides = _overrides_of(MethodConfig, "MethodOverrides")


class DistillConfig(BaseModel):
    """The ``distill:`` section: method, LoRA, optimiser and run-length settings (METHOD 5-6).

    ``method`` picks a preset of :class:`rmd.distill.algorithm.MethodConfig`
    (``rmd.distill.algorithm.PRESETS``); ``method_config`` overrides single settings of it.
    Unset values are filled when the run config is resolved (``rmd.distill.config``):
    ``teacher`` defaults to the shipped toy teacher, ``fake_lr`` to ``generator_lr``
    (TDM: 5x ``generator_lr``), the matching CFG scale to ``teacher_guidance_scale``.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["rmd", "dmd2", "tdm", "naive", "swd"] = "rmd"
    teacher: Optional[str] = Field(None, description="teacher model folder (default: the shipped toy teacher); "
                                   "for real backbones a local diffusers pipeline folder (`rmd distill --model`)")
    prompts: Optional[str] = Field(None, description="prompt file to distil from (.txt, .jsonl, .csv); required for "
                                   "real backbones, unused by the toy (its world draws prompts)")
    method_config: MethodOverrides = Field(default_factory=MethodOverrides)  # type: ignore[valid-type]
    lora_rank: int = Field(16, ge=1)
    lora_alpha: Optional[float] = Field(None, gt=0, description="default: lora_rank (LoRA scale 1)")
    lora_targets: Optional[list[str]] = Field(None, description="module names; default: attention projections")
    generator_lr: float = Field(1e-4, gt=0)
    fake_lr: Optional[float] = Field(None, gt=0, description="default: generator_lr; TDM: 5x generator_lr")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    generator_ema: float = Field(0.0, ge=0, lt=1, description="decay of an exponential moving average of the "
                                 "generator's LoRA weights, taken after every update; sample grids, the export "
                                 "and checkpoint sampling use it (0: off, the last weights)")
    stage_loss_weights: Optional[list[float]] = Field(None, description="w_k of the generator loss, one per stage")
    batch_size: int = Field(8, ge=1, description="prompts per process and iteration")
    max_steps: int = Field(500, ge=1, description="generator updates")
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = Field(3, ge=1, description="checkpoints kept on disk")
    sample_every: int = Field(100, ge=0, description="write a sample grid every K iterations (0: never)")
    num_sample_images: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    max_bad_steps: int = Field(20, ge=1, description="iterations in a row with a non-finite loss or gradient "
                               "(updates skipped) before training stops")
    mixed_precision: Literal["no", "bf16"] = "no"
    sharding: Literal["none", "fsdp"] = Field("none", description="fsdp: shard the base network and both LoRAs "
                                              "over processes (torch FSDP2); also set by an accelerate FSDP config")
    gradient_checkpointing: bool = False


class Architecture(BaseModel):
    """The backbone's public configuration, enough to build it without weights (``rmd plan``).

    ``config`` holds the keyword arguments of the diffusers class (its ``config.json``);
    ``text_tokens`` x ``text_dim`` is the prompt embedding the backbone reads, ``pooled_dim``
    the pooled one (SDXL, SD3). ``params`` is the published parameter count, a check on the config.
    """

    model_config = ConfigDict(extra="forbid")

    class_name: Literal["UNet2DConditionModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                        "WanTransformer3DModel"]
    config: dict[str, Any]
    text_tokens: int = Field(ge=1)
    text_dim: int = Field(ge=1)
    pooled_dim: Optional[int] = Field(None, ge=1)
    vae_scale_factor: int = Field(8, ge=1)
    vae_temporal_factor: int = Field(4, ge=1)
    params: Optional[float] = Field(None, gt=0, description="published parameter count of the network")
    source: str = ""


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
    distill: Optional[DistillConfig] = None
    architecture: Optional[Architecture] = None


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
