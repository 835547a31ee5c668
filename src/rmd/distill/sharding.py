"""FSDP for the shared base: the network's weights sharded over processes (torch FSDP2, ``fully_shard``).

With ``sharding: fsdp`` (or ``accelerate launch`` with an FSDP config) every block of the base
network and then the network itself are wrapped with ``fully_shard`` *after* the two LoRA adapters
are added, so the frozen weights and both adapters are split across ranks, gathered block by block
for each forward and backward, and the LoRA gradients are averaged by FSDP's reduce-scatter.

Why this works with three roles on one base: FSDP2 hooks the modules themselves (not a wrapper),
so the denoiser adapter can call the inner network as before, and peft's role switches only flip
flags on the modules between forwards. What changes for the trainer, and lives here:

- gradient clipping takes the global norm of sharded gradients (:func:`clip_grad_norm`);
- checkpoints hold *full* tensors, gathered on every rank and written by rank 0, in the same format
  as unsharded runs: a run may be resumed with or without FSDP;
- the merged export is built on rank 0 from a fresh, unsharded copy of the base network;
- sample grids are drawn on every rank (each forward is a collective) and written by rank 0.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every rank must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def model_is_sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` every block of every top-level ``ModuleList`` (transformer blocks, UNet levels),
    then the root, so at most one block's weights are gathered at a time."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                if any(True for _ in block.parameters()):
                    fully_shard(block)
    fully_shard(model)
    return model


def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for a mix of sharded and plain parameters; returns the global norm.

    Unsharded parameter lists take torch's own function (bit for bit what unsharded runs did).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    # one all-reduce of the summed squares of the local shards (a 1-D mesh over all ranks, as
    # shard_model builds it), not one collective and one device sync per tensor
    sharded_sq = torch.zeros((), dtype=torch.float32, device=grads[0].to_local().device
                             if is_sharded(grads[0]) else grads[0].device)
    plain_sq = torch.zeros((), dtype=torch.float32, device=sharded_sq.device)
    for g in grads:
        if is_sharded(g):
            sharded_sq += g.to_local().detach().float().pow(2).sum().to(sharded_sq.device)
        else:  # replicated: the same on every rank, counted once
            plain_sq += g.detach().float().pow(2).sum().to(plain_sq.device)
    torch.distributed.all_reduce(sharded_sq)
    total = (sharded_sq + plain_sq).sqrt().to("cpu")
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    if torch.isfinite(total) and coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def full_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A (possibly sharded) state dict with every tensor whole and on the CPU (collective)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = full_state_dict(v)
        elif isinstance(v, torch.Tensor):
            out[k] = full(v).detach().to("cpu").contiguous()
        else:
            out[k] = v
    return out


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with sharded moments gathered: the format an unsharded run saves (collective)."""
    sd = opt.state_dict()
    return {"state": {i: full_state_dict(s) for i, s in sd["state"].items()}, "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a full (unsharded-format) optimiser state into an optimiser over possibly sharded parameters."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in opt.param_groups for p in group["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                        if is_sharded(p) and isinstance(v, torch.Tensor) and v.shape == p.shape else v)
                    for k, v in s.items()}
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


__all__ = ["clip_grad_norm", "full", "full_optimizer_state", "full_state_dict", "is_sharded", "load_optimizer_state",
           "model_is_sharded", "shard_model"]
