"""``rmd plan``: FLOPs, predicted speedups and training memory of a recipe, without weights.

The backbone is built from the recipe's ``architecture`` (its public diffusers config) on
the meta device: no memory, no download. Then:

* FLOPs of one network call at each resolution of the stage plan, batch 1, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on a real forward (shapes only on meta);
* predicted speedups from FLOPs: the cascade ``sum_i F(res_i)`` against the N-step
  student at full resolution ``N F(R)``, and against the teacher's NFE with CFG
  ``teacher_steps x 2 x F(R)`` (METHOD 7 counts speed this way, in NFE);
* training memory per role (weights, adapters, gradients, optimiser states) for the
  shared base (one frozen base in bf16 + two LoRA roles) and for DMD2's three full copies
  (a frozen teacher + a fully fine-tuned generator and fake score), plus the activations
  saved for the generator's backward at a given batch size (measured on meta with
  saved-tensor hooks).

Byte accounting (stated, not guessed per run): frozen weights in bf16 (2 bytes); every
trained parameter keeps an fp32 master copy (4), an fp32 gradient (4) and Adam's two fp32
moments (8): 16 bytes per trained parameter. Activations in bf16.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import torch
from torch import nn

GIB = 2**30
FROZEN_BYTES = 2
TRAINED_BYTES = 16  # fp32 master 4 + fp32 grad 4 + Adam moments 8

# The paper's speedups (METHOD 7): over the 4-step (Wan: 6-step) student and over the teacher.
PAPER = {
    "sdxl": {"speedup_vs_single_res": 33.4 / 20.0, "speedup_vs_teacher": 33.4},
    "pixart-sigma": {"speedup_vs_single_res": 21.0 / 12.5, "speedup_vs_teacher": 21.0},
    "sd35-medium": {"speedup_vs_single_res": 32.0 / 20.0, "speedup_vs_teacher": 32.0},
    "wan21-14b": {"speedup_vs_single_res": 25.6 / 16.7, "speedup_vs_teacher": 25.6},
}


def build_on_meta(arch, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The diffusers network of an :class:`rmd.recipes.Architecture`, parameters on the meta device."""
    import diffusers

    from .plan import PlanError

    cls = getattr(diffusers, arch.class_name)
    try:
        with torch.device("meta"):
            model = cls(**arch.config)
    except (TypeError, ValueError) as e:
        raise PlanError(f"architecture.config does not build a {arch.class_name}: {e}") from None
    return model.to(dtype).eval().requires_grad_(False)  # the frozen base


def latent_shape(arch, size: tuple[int, int], frames: Optional[int]) -> tuple[int, ...]:
    c = arch.config.get("in_channels", 4)
    h, w = size[0] // arch.vae_scale_factor, size[1] // arch.vae_scale_factor
    if arch.class_name == "WanTransformer3DModel":
        t = (frames - 1) // arch.vae_temporal_factor + 1 if frames else 1
        return (c, t, h, w)
    return (c, h, w)


def forward(model: nn.Module, arch, x: torch.Tensor) -> torch.Tensor:
    """One call of the network with conditioning of the recipe's shapes (values do not matter here)."""
    b, dev, dt = x.shape[0], x.device, x.dtype
    text = torch.zeros(b, arch.text_tokens, arch.text_dim, device=dev, dtype=dt)
    t = torch.full((b,), 500.0, device=dev)
    name = arch.class_name
    if name == "UNet2DConditionModel":
        extra = {"text_embeds": torch.zeros(b, arch.pooled_dim, device=dev, dtype=dt),
                 "time_ids": torch.zeros(b, 6, device=dev, dtype=dt)}
        return model(x, t, encoder_hidden_states=text, added_cond_kwargs=extra).sample
    if name == "PixArtTransformer2DModel":
        return model(x, encoder_hidden_states=text, timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    if name == "SD3Transformer2DModel":
        pooled = torch.zeros(b, arch.pooled_dim, device=dev, dtype=dt)
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
    return model(hidden_states=x, timestep=t, encoder_hidden_states=text).sample


def count_flops(model: nn.Module, arch, size: tuple[int, int], frames: Optional[int], batch: int = 1,
                device: str = "meta") -> int:
    """FLOPs of one forward (torch's counter: matmuls and convolutions, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    dtype = next(model.parameters()).dtype
    x = torch.zeros(batch, *latent_shape(arch, size, frames), device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward(model, arch, x)
    return int(counter.get_total_flops())


def lora_params(model: nn.Module, rank: int, targets: Optional[list[str]] = None) -> int:
    """Parameters of one LoRA role of rank ``rank`` on the targets (default: the attention projections)."""
    from .distill.roles import default_lora_targets

    targets = targets or default_lora_targets(model)
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


class _FusedAttentionShape(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while activations are counted.

    On the meta device PyTorch decomposes attention into its math form, which saves the
    L x L probability matrix; the fused kernels used in training (flash / memory-efficient)
    save only q, k, v, the output and one log-sum-exp per query. This saves exactly those.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - shapes only, never run
        raise RuntimeError("shape-only attention has no backward")


def activation_bytes(model: nn.Module, arch, size: tuple[int, int], frames: Optional[int], batch: int) -> int:
    """Bytes autograd saves for the generator's backward (input gradient through the frozen base), on meta.

    Each saved tensor is counted once (several ops saving the same tensor share it); weights
    (and views of them) are not activations and are left out, since the memory plan counts
    them already; other views of one tensor saved as different objects are counted again, so
    this errs on the high side. Attention is counted as a fused kernel saves it
    (:class:`_FusedAttentionShape`). Inputs the LoRA layers save for their own weight
    gradients are mostly the same tensors and are not added.
    """
    import torch.nn.functional as F

    def attention(query=None, key=None, value=None, *args, **kwargs):
        if args:  # positional call: (query, key, value, attn_mask, ...)
            raise TypeError("unexpected positional arguments")
        return _FusedAttentionShape.apply(query, key, value)

    dtype = next(model.parameters()).dtype
    x = torch.zeros(batch, *latent_shape(arch, size, frames), device="meta", dtype=dtype, requires_grad=True)
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = attention
    try:
        return _count_saved(lambda: forward(model, arch, x), model)
    finally:
        F.scaled_dot_product_attention = original


def _count_saved(run, model: nn.Module) -> int:
    """Bytes of the tensors autograd saves while ``run()`` builds its graph, weights of ``model`` excluded."""
    params = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            seen.setdefault(id(t), t)  # keeping t alive keeps its id unique
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(t.numel() * t.element_size() for t in seen.values())


def memory_plan(base_params: int, lora: int) -> dict[str, dict[str, float]]:
    """GiB per role: the shared base (frozen base + two LoRA roles) vs three full copies (DMD2)."""
    shared = {
        "base_weights": base_params * FROZEN_BYTES,
        "adapters": 2 * lora * 4,  # generator and fake LoRA, fp32 masters
        "gradients": 2 * lora * 4,
        "optimizer": 2 * lora * 8,
    }
    copies = {
        "teacher_weights": base_params * FROZEN_BYTES,
        "generator_weights": base_params * 4,
        "fake_weights": base_params * 4,
        "gradients": 2 * base_params * 4,
        "optimizer": 2 * base_params * 8,
    }
    out = {}
    for name, parts in (("shared_base", shared), ("three_copies", copies)):
        gib = {k: v / GIB for k, v in parts.items()}
        gib["total"] = sum(parts.values()) / GIB
        out[name] = gib
    return out


def plan_recipe(name: str, lora_rank: Optional[int] = None, batch: int = 2, gpu_gib: float = 80e9 / GIB,
                flops: bool = True) -> dict[str, Any]:
    """Everything ``rmd plan --recipe NAME`` reports, as a dict."""
    from .recipes import load_recipe

    recipe = load_recipe(name)
    if recipe.architecture is None:
        from .plan import PlanError

        raise PlanError(f"recipe {name!r} has no architecture section (the backbone's public config); "
                        "add one to plan it (see the sdxl recipe)")
    arch = recipe.architecture
    plan = recipe.schedule.plan()
    rank = lora_rank or (recipe.distill.lora_rank if recipe.distill and "lora_rank" in recipe.distill.model_fields_set
                         else 64)
    model = build_on_meta(arch)
    params = sum(p.numel() for p in model.parameters())
    sizes = list(dict.fromkeys(step.size for step in plan.steps))
    target = plan.steps[-1].size
    per_call = {s: count_flops(model, arch, s, recipe.frames) for s in sizes} if flops else {}
    out: dict[str, Any] = {"recipe": name, "backbone": arch.class_name, "params": params,
                           "params_published": arch.params, "lora_rank": rank}
    if flops:
        cascade = sum(per_call[step.size] for step in plan.steps)
        n = plan.num_steps
        cfg_calls = 1 if recipe.teacher_guidance_scale == 1.0 else 2
        out.update({
            "flops_per_call": {f"{h}x{w}": f for (h, w), f in per_call.items()},
            "allocation": "+".join(str(len(s.steps)) for s in plan.stages),
            "speedup_vs_single_res": n * per_call[target] / cascade,
            "speedup_vs_teacher": recipe.teacher_steps * cfg_calls * per_call[target] / cascade,
            "teacher_nfe": recipe.teacher_steps * cfg_calls,
            "paper": PAPER.get(name),
        })
    lora = lora_params(model, rank)
    mem = memory_plan(params, lora)
    act = activation_bytes(model, arch, target, recipe.frames, batch) / GIB
    mem["activations_generator_backward"] = {"batch": batch, "gib": act}
    mem["gpu_gib"] = gpu_gib
    mem["shared_base_fits_with_activations"] = mem["shared_base"]["total"] + act <= gpu_gib
    mem["three_copies_fit_without_activations"] = mem["three_copies"]["total"] <= gpu_gib
    out["lora_params_per_role"] = lora
    out["memory_gib"] = mem
    return out


def format_plan(r: dict[str, Any]) -> str:
    m = r["memory_gib"]
    lines = [f"{r['recipe']}: {r['backbone']}, {r['params'] / 1e9:.3f} B parameters"
             + (f" (published {r['params_published'] / 1e9:.3g} B)" if r.get("params_published") else "")]
    if "flops_per_call" in r:
        lines.append("TFLOPs per call (batch 1): " + ", ".join(f"{k}: {v / 1e12:.2f}"
                                                               for k, v in r["flops_per_call"].items()))
        paper = r.get("paper") or {}
        lines.append(f"{r['allocation']} cascade: {r['speedup_vs_single_res']:.2f}x over the full-resolution student"
                     + (f" (paper {paper['speedup_vs_single_res']:.2f}x)" if paper else "")
                     + f", {r['speedup_vs_teacher']:.1f}x over the teacher's {r['teacher_nfe']} NFE"
                     + (f" (paper {paper['speedup_vs_teacher']:.1f}x)" if paper else ""))
    for key in ("shared_base", "three_copies"):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in m[key].items() if k != "total")
        lines.append(f"{key}: {m[key]['total']:.1f} GiB ({parts})")
    a = m["activations_generator_backward"]
    lines.append(f"activations for the generator's backward at batch {a['batch']}: {a['gib']:.1f} GiB; "
                 f"shared base + activations fit {m['gpu_gib']:.1f} GiB: {m['shared_base_fits_with_activations']}; "
                 f"three copies fit even without activations: {m['three_copies_fit_without_activations']}")
    return "\n".join(lines)


def run_plan_command(args: Any) -> None:
    from .cli import UserError

    if args.batch < 1:
        raise UserError("--batch must be at least 1")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise UserError("--lora-rank must be at least 1")
    result = plan_recipe(args.recipe, args.lora_rank, args.batch)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(format_plan(result))
