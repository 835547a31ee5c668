"""Inner-block token features of the shared base, and the GAN discriminator head on them.

Both extra objectives of METHOD 6 read one inner transformer block of the backbone:

- the GAN of DMD2: a small classifier head on the *fake score's* features, trained with
  the fake score, whose non-saturating loss the generator also receives;
- SwD's Patch Distribution Matching (PDM): an MMD between the token features of
  generated and real samples noised with the same noise (:func:`rmd.distill.losses.pdm_loss`).

The features are taken with a forward hook on the block, so the denoiser adapters of
:mod:`rmd.denoisers` are used unchanged. When only the features are wanted the hook
stops the forward right after the block: the later blocks would be wasted work.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class _Stop(Exception):
    """Raised by the hook to end a forward whose output is not needed."""


def inner_blocks(model: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer blocks (SD3 / PixArt / Flux: ``transformer_blocks``; Wan: ``blocks``)."""
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
    raise ValueError(f"{type(model).__name__} has no transformer_blocks / blocks list to take features from; "
                     "GAN and PDM need a transformer backbone (set gan_weight and pdm_weight to 0)")


def block_index(model: nn.Module, block: Optional[int]) -> int:
    """``block`` checked against the model's depth; None = the middle block (DMD2 reads the bottleneck)."""
    n = len(inner_blocks(model))
    i = n // 2 if block is None else block
    if not 0 <= i < n:
        raise ValueError(f"feature block {block} is out of range: the backbone has {n} blocks (0..{n - 1})")
    return i


def feature_dim(model: nn.Module) -> int:
    """Width of the image tokens: heads x head width in the diffusers transformer configs."""
    cfg = getattr(model, "config", None)
    try:
        return int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
    except (AttributeError, TypeError):
        raise ValueError(f"cannot tell the token width of {type(model).__name__} "
                         "(no num_attention_heads / attention_head_dim in its config)") from None


def _tokens(out) -> Tensor:
    """The image tokens (B, N, D) from a block's output.

    SD3's joint blocks return ``(encoder_hidden_states, hidden_states)``: the image stream
    is the last tensor. A (B, C, H, W) map is read as H*W tokens of width C.
    """
    if isinstance(out, (tuple, list)):
        out = [o for o in out if isinstance(o, Tensor)][-1]
    return out.flatten(2).transpose(1, 2) if out.dim() == 4 else out


class BlockFeatures:
    """Context manager: record the token features of one block during the forwards inside it.

    ``stop=True`` ends each forward after the block (the caller then gets the features
    only; the denoiser call is made through :meth:`run`).
    """

    def __init__(self, model: nn.Module, block: Optional[int] = None, stop: bool = False):
        self.module = inner_blocks(model)[block_index(model, block)]
        self.stop = stop
        self.value: Optional[Tensor] = None
        self._handle = None

    def _hook(self, module, args, out) -> None:
        self.value = _tokens(out)
        if self.stop:
            raise _Stop

    def __enter__(self) -> "BlockFeatures":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def run(self, fn, *args, **kwargs) -> Tensor:
        """Call ``fn`` (a denoiser) and return the recorded features."""
        self.value = None
        try:
            fn(*args, **kwargs)
        except _Stop:
            pass
        if self.value is None:
            raise RuntimeError("the feature block did not run in this forward")
        return self.value


def features(model: nn.Module, block: Optional[int], fn, *args, **kwargs) -> Tensor:
    """Token features of ``block`` for one call of ``fn`` (the forward stops after the block)."""
    with BlockFeatures(model, block, stop=True) as tap:
        return tap.run(fn, *args, **kwargs)


class DiscriminatorHead(nn.Module):
    """Per-token logits from inner-block features: LayerNorm -> Linear -> SiLU -> Linear.

    A small head in the spirit of DMD2's classifier on the fake score's bottleneck; the
    GAN losses average the token logits per sample (:mod:`rmd.distill.losses`).
    """

    def __init__(self, dim: int, hidden: int = 64, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # initialised from ``seed`` alone, global RNG untouched
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens.float()).squeeze(-1)  # (B, N)
