"""One base network, three roles (METHOD.md section 5).

teacher    = the base with every adapter off (frozen "real score");
generator  = the base with LoRA adapter "generator";
fake score = the base with LoRA adapter "fake".

Sharing the base keeps one copy of the backbone's weights in memory instead of
three. The peft pitfalls this module exists to contain:

- ``disable_adapters()`` also switches ``requires_grad`` off on the LoRA weights,
  and ``set_adapter`` switches it off on the inactive adapter, so every switch
  here restores ``requires_grad`` on all trainable adapters;
- with gradient checkpointing, backward recomputes each block's forward with
  whatever adapter is active *at backward time*: a graph must be built and
  differentiated under the same role. :meth:`SharedBase.role` records the role
  of the graph being built, and :meth:`SharedBase.backward` switches back to it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

ROLES = ("teacher", "generator", "fake")


def default_lora_targets(model: nn.Module) -> list[str]:
    """Attention projections of a diffusers backbone (the usual LoRA targets)."""
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    wanted = [n for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    present = [n for n in wanted if n.split(".")[-1] in names or n in names]
    if not present:
        raise ValueError("found no attention projections (to_q/to_k/to_v) to put LoRA on; pass lora_targets explicitly")
    return present


def with_adapter_methods(model: nn.Module) -> nn.Module:
    """Give a diffusers model diffusers' peft methods (``add_adapter``, ``set_adapter``, ``fuse_lora``...).

    Most diffusers networks inherit ``PeftAdapterMixin``; ``PixArtTransformer2DModel`` does not
    (diffusers 0.42). Its instance gets a subclass of the same name that adds the mixin, so
    the roles, merging and saving work unchanged, and a saved config still names the real class.
    """
    from diffusers.loaders.peft import PeftAdapterMixin

    if not isinstance(model, PeftAdapterMixin):
        cls = type(model)
        model.__class__ = type(cls.__name__, (cls, PeftAdapterMixin), {"__module__": cls.__module__})
    return model


class SharedBase:
    """Wraps a diffusers model that supports peft adapters (``add_adapter``/``set_adapter``)."""

    def __init__(self, model: nn.Module, rank: int = 16, alpha: Optional[float] = None,
                 targets: Optional[Sequence[str]] = None, init_seed: int = 0):
        from peft import LoraConfig

        self.model = model = with_adapter_methods(model)
        model.requires_grad_(False)
        targets = list(targets) if targets is not None else default_lora_targets(model)
        for name in ("generator", "fake"):
            torch.manual_seed(init_seed)  # lora_B starts at zero: both roles start equal to the teacher
            model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets,
                                         init_lora_weights=True), adapter_name=name)
        # peft makes the adapters in the base's dtype. The trained weights stay float32 under a
        # bf16 base: an AdamW step of lr 1e-5 on a bf16 weight near 0.01 is below half its
        # rounding step (3.9e-5) and is lost, so bf16 LoRA weights would never move.
        for role in ("generator", "fake"):
            for p in self.parameters(role):
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
        self._current = "teacher"
        self.role("generator")

    def parameters(self, role: str) -> list[nn.Parameter]:
        """The trainable LoRA weights of one role."""
        if role not in ("generator", "fake"):
            raise ValueError(f"role must be 'generator' or 'fake', got {role!r}")
        return [p for n, p in self.model.named_parameters() if f".{role}." in n and "lora_" in n]

    def _restore_grad(self) -> None:
        for role in ("generator", "fake"):
            for p in self.parameters(role):
                p.requires_grad_(True)

    def role(self, role: str) -> None:
        """Make ``role`` the active behaviour of the shared model."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role == "teacher":
            self.model.disable_adapters()
        else:
            self.model.enable_adapters()
            self.model.set_adapter(role)
        self._restore_grad()
        self._current = role

    @property
    def current(self) -> str:
        return self._current

    @contextlib.contextmanager
    def as_role(self, role: str) -> Iterator[None]:
        """Temporarily switch role (e.g. no-grad teacher/fake evaluations), then switch back."""
        prev = self._current
        self.role(role)
        try:
            yield
        finally:
            self.role(prev)

    def backward(self, loss: torch.Tensor, role: str) -> None:
        """Backward under the role whose graph ``loss`` was built with (gradient checkpointing safe)."""
        prev = self._current
        self.role(role)
        try:
            loss.backward()
        finally:
            self.role(prev)

    def adapter_state(self, role: str) -> dict[str, torch.Tensor]:
        """The role's LoRA weights, keyed without the adapter name (as peft saves them)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=role)
