"""The distillation trainer: the loop around :func:`rmd.distill.algorithm.distill_iteration`.

One code path from one CPU process to many GPUs (``accelerate launch``). Per iteration
(Algorithm 1): draw prompts, encode them once without gradients, run one generator update
and ``fake_updates`` fake-score updates, log, and now and then write a sample grid and a
checkpoint. At the end the generator is exported as a LoRA (diffusers layout) and as a
full model with the LoRA merged.

Run folder::

    DIR/config.yaml      the resolved RunConfig (``rmd distill --config DIR/config.yaml`` re-runs it)
    DIR/run.json         config, stage plan, method settings, world size, status, exports
    DIR/metrics.jsonl    one JSON line per iteration (rank 0): step, loss_generator, loss_fake, ...
    DIR/tensorboard/     scalars and sample grids
    DIR/samples/         step-XXXXXXXX.png sample grids
    DIR/checkpoints/step-XXXXXXXX/   LoRA of both roles, optimiser states, config, state.json
                                     (+ heads.safetensors: the GAN discriminator head, when gan_weight > 0)
                                     (+ generator_ema.safetensors: the generator's average, generator_ema > 0)
    DIR/export/generator_lora/pytorch_lora_weights.safetensors   (diffusers ``load_lora_adapter``; the
                                     EMA weights when generator_ema > 0)
    DIR/export/generator_full/       the merged generator (toy: a folder ``load_teacher`` reads)

Determinism and exact resume: iteration ``i`` on rank ``r`` draws everything (prompts,
stage, step, noise, and the global torch seed) from ``(seed, i, r)`` alone, so an
iteration is a pure function of (weights, optimiser state, i). A checkpoint therefore
needs no RNG state: weights + optimiser states + i reproduce the run bit for bit on CPU.

Launching: one process is ``rmd distill ...``; several are
``accelerate launch --multi_gpu --num_processes N -m rmd.cli distill ...`` on GPUs, or
``torchrun --nproc_per_node N -m rmd.cli distill ...`` for CPU processes (gloo). (Beware:
``accelerate launch --cpu --num_processes 2`` silently starts ONE process unless MPI is set up.)
``batch_size`` is per process. Mixed precision (``bf16``) is the run config's, via
``torch.autocast``; fp16 is not offered because the updates have no loss scaling.

Multi-process: why gradients are all-reduced by hand, not by DDP. One base network
plays three roles (teacher = adapters off, generator, fake score). An iteration runs
several forwards under different roles (no-grad simulation, teacher, fake) and then two
or more backward passes that each reach only one role's LoRA, all through the denoiser
adapter calling the *inner* model. DDP ties its gradient hooks to forwards of its
wrapper and expects every trainable parameter to get a gradient in each backward (else
``find_unused_parameters``, one graph walk per forward); bending it to role switching
(and to gradient checkpointing, which recomputes forwards) is fragile. So the model is
not wrapped: :class:`SyncedSharedBase` averages the active role's LoRA gradients over
processes right after each backward (one flat all-reduce), before clipping and the
optimiser step -- what DDP would do. All ranks start from rank 0's LoRA weights, so they
stay identical; every checkpoint verifies it (a hash per rank) and fails loudly otherwise.
With several processes all ranks share the iteration's stage and step (Algorithm 1 draws one per
batch); prompts and noise stay per rank.

FSDP (``sharding: fsdp``, or an accelerate launch whose distributed type is FSDP): the base
network and both LoRAs are sharded with torch's ``fully_shard`` after the adapters exist
(:mod:`rmd.distill.sharding`); FSDP's reduce-scatter then averages the LoRA gradients, checkpoints
gather whole tensors (same files as unsharded runs), and the export merges into a fresh copy of
the base. DeepSpeed is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..denoisers import Conditioning, Denoiser, from_model
from ..plan import PlanError
from .algorithm import MethodConfig, distill_iteration
from .config import LOGISTIC_KEYS, RunConfig, config_differences, load_run_config, write_config
from .roles import SharedBase

CHECKPOINTS = "checkpoints"
CHECKPOINT_FILES = ("generator.safetensors", "fake.safetensors", "optimizer.pt", "config.yaml", "state.json")
HEADS_FILE = "heads.safetensors"  # only in runs with a discriminator head (gan_weight > 0)
_CKPT_NAME = re.compile(r"^step-(\d{8})$")


def _user_error(msg: str) -> Exception:
    from ..cli import UserError

    return UserError(msg)


# --- backbones ------------------------------------------------------------------------------


@dataclass
class Backbone:
    """What the trainer needs from a model family.

    ``model`` is the frozen teacher network the LoRA adapters go on; ``make_denoiser``
    wraps it in its ``rmd.denoisers`` adapter (normally :func:`rmd.denoisers.from_model`);
    ``encode`` turns prompts into a :class:`Conditioning` (no gradients); ``train_prompts``
    draws a batch of training prompts from an rng; ``decode`` maps latents to images in
    [-1, 1] (None: pixel space); ``save_full`` writes a merged model folder; ``save_lora``
    writes a LoRA state dict (+ peft metadata) in the family's diffusers layout, whose keys
    carry ``lora_prefix``. ``train_batch`` (optional) draws prompts *with* real samples for
    them, ``(prompts, x0)``: clean samples in the denoiser's state space (pixels in [-1, 1],
    or VAE latents) at the teacher resolution; GAN and PDM (``gan_weight`` / ``pdm_weight``)
    need it.
    """

    name: str
    model: nn.Module
    make_denoiser: Callable[[], Denoiser]
    encode: Callable[[Sequence[str]], Conditioning]
    train_prompts: Callable[[int, random.Random], list[str]]
    sample_prompts: Callable[[int], list[str]]
    save_full: Callable[[nn.Module, str], None]
    save_lora: Callable[[dict[str, torch.Tensor], dict, str], None]
    lora_prefix: str
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    train_batch: Optional[Callable[[int, random.Random], tuple[list[str], torch.Tensor]]] = None
    extra_modules: list[nn.Module] = field(default_factory=list)  # moved to the device with the model
    fresh_model: Optional[Callable[[], nn.Module]] = None  # a new unsharded copy of the base network (FSDP export)

    def to(self, device: torch.device) -> "Backbone":
        self.model.to(device)
        for m in self.extra_modules:
            m.to(device)
        return self


def _toy_backbone(cfg: RunConfig, sampling: bool = False) -> Backbone:
    """The toy SD3-class teacher (pixel space) and its CLIP-style text tower."""
    from ..lora import save_generator_lora
    from ..toy.teacher import load_teacher, save_teacher
    from ..toy.world import prompt_for, render, sample_scenes

    try:
        teacher = load_teacher(cfg.teacher)
    except (FileNotFoundError, ValueError) as e:  # missing components, wrong class, wrong channel count
        raise _user_error(str(e)) from None
    model = teacher.transformer

    def train_prompts(n: int, rng: random.Random) -> list[str]:
        scenes = sample_scenes(n, rng.randrange(2**31), split="train")
        return [prompt_for(s, rng.randrange(2**31)) for s in scenes]

    real_size = cfg.plan().teacher_size[0]  # toy images are square

    def train_batch(n: int, rng: random.Random) -> tuple[list[str], torch.Tensor]:
        # the renderer's clean images are the toy world's "real data" at the matching resolution
        scenes = sample_scenes(n, rng.randrange(2**31), split="train")
        prompts = [prompt_for(s, rng.randrange(2**31)) for s in scenes]
        return prompts, render(scenes, real_size, [rng.randrange(2**31) for _ in scenes])

    def sample_prompts(n: int) -> list[str]:
        # fixed across the run (and across runs): grids at different steps are comparable
        return [prompt_for(s, i) for i, s in enumerate(sample_scenes(n, 20240607, split="train"))]

    def save_lora(state: dict[str, torch.Tensor], metadata: dict, path: str) -> None:
        save_generator_lora("toy", state, metadata, path)

    return Backbone(
        name="toy",
        model=model,
        make_denoiser=lambda: from_model(model, vae_scale_factor=1),
        encode=teacher.text.encode,  # batched, under torch.no_grad
        train_prompts=train_prompts,
        train_batch=train_batch,
        sample_prompts=sample_prompts,
        save_full=lambda merged, path: save_teacher(path, merged, teacher.text, teacher.config),
        save_lora=save_lora,
        lora_prefix="transformer",
        extra_modules=teacher.text.modules,
        fresh_model=lambda: load_teacher(cfg.teacher).transformer,
    )


def _family_backbone(cfg: RunConfig, sampling: bool = False) -> Backbone:
    from .family_backbone import family_backbone

    return family_backbone(cfg, sampling=sampling)


# A new family plugs in here: a loader that returns a Backbone around rmd.denoisers.from_model
# (see rmd.distill.family_backbone and the family table in rmd.families).
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "toy": _toy_backbone, "sdxl": _family_backbone, "pixart-sigma": _family_backbone, "sd3": _family_backbone,
    "wan": _family_backbone}


def build_backbone(cfg: RunConfig, sampling: bool = False) -> Backbone:
    """The run's model family; ``sampling=True``: for sampling only (any prompt, no training prompt list)."""
    if cfg.backbone not in BACKBONES:
        raise _user_error(
            f"distillation of backbone {cfg.backbone!r} is not wired up yet (available: {sorted(BACKBONES)}); "
            "register a loader in rmd.distill.train.BACKBONES that builds a Backbone around rmd.denoisers.from_model"
        )
    return BACKBONES[cfg.backbone](cfg, sampling=sampling)


# --- the shared base, synchronised over processes ------------------------------------------


class SyncedSharedBase(SharedBase):
    """:class:`SharedBase` whose :meth:`backward` averages the role's LoRA gradients over processes.

    This is DDP's gradient averaging done by hand, once per backward (see the module
    docstring for why the model is not wrapped in DDP). With one process it is SharedBase.
    ``extra[role]`` lists further parameters trained in that role's backward (the GAN head
    in the fake update); they are averaged too.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.extra: dict[str, list[nn.Parameter]] = {}

    def backward(self, loss: torch.Tensor, role: str) -> None:
        from .sharding import is_sharded

        super().backward(loss, role)
        # sharded (FSDP) parameters had their gradients averaged by FSDP's reduce-scatter already
        all_reduce_mean_grads([p for p in self.parameters(role) + self.extra.get(role, []) if not is_sharded(p)])


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_grads(params: Sequence[nn.Parameter]) -> None:
    """Average ``p.grad`` over processes, in one flat all-reduce (missing grads count as zero)."""
    world = _world()
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def broadcast_params(params: Sequence[nn.Parameter], src: int = 0) -> None:
    """Copy rank ``src``'s values into every rank (start identical, stay identical)."""
    if _world() == 1:
        return
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=src)


@dataclass
class Student:
    """The backbone with its two LoRA roles; ``denoiser()`` follows the active role.

    ``head`` is the GAN discriminator head (``gan_weight`` > 0), trained with the fake score.
    """

    cfg: RunConfig
    backbone: Backbone
    base: SharedBase
    head: Optional[nn.Module] = None

    def denoiser(self) -> Denoiser:
        return self.backbone.make_denoiser()

    def lora_params(self) -> list[nn.Parameter]:
        return self.base.parameters("generator") + self.base.parameters("fake")

    def head_params(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) if self.head is not None else []

    def trained_params(self) -> list[nn.Parameter]:
        """Everything the run trains (kept identical over processes): both LoRAs and the head."""
        return self.lora_params() + self.head_params()


def build_student(cfg: RunConfig, device: Optional[torch.device] = None, synced: bool = True,
                  sampling: bool = False) -> Student:
    """Teacher network + generator and fake LoRA adapters (B = 0: both start as the teacher).

    ``sampling=True`` builds it to sample from (``rmd sample``): real families then keep their
    text encoders instead of reading the training prompts' embedding cache.
    """
    backbone = build_backbone(cfg, sampling=sampling)
    method = cfg.method_config
    den = backbone.make_denoiser()
    for size in dict.fromkeys(step.size for step in cfg.plan().steps):
        try:
            den.check_size(size, cfg.frames)
        except ValueError as e:  # rmd.denoisers.SizeError names the sizes that would work
            raise _user_error(f"schedule.resolutions: {e}") from None
    if method.needs_real and backbone.train_batch is None:
        raise _user_error(f"method_config.gan_weight / pdm_weight > 0 compare with real images, but backbone "
                          f"{backbone.name!r} provides none (Backbone.train_batch); set both weights to 0 or give "
                          "the backbone a train_batch(n, rng) -> (prompts, real samples)")
    cls = SyncedSharedBase if synced else SharedBase
    with warnings.catch_warnings():  # peft warns when a second adapter is added: two adapters are the design
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        base = cls(backbone.model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                   init_seed=cfg.seed)
    if cfg.gradient_checkpointing:
        backbone.model.enable_gradient_checkpointing()  # safe: SharedBase.backward restores the graph's role
    from .features import DiscriminatorHead, block_index, feature_dim

    for name, weight, block in (("gan_block", method.gan_weight, method.gan_block),
                                ("pdm_block", method.pdm_weight, method.pdm_block)):
        try:
            if weight > 0:
                block_index(backbone.model, block)
        except ValueError as e:
            raise _user_error(f"method_config.{name}: {e}") from None
    head = None
    if method.gan_weight > 0:
        head = DiscriminatorHead(feature_dim(backbone.model), method.gan_hidden, seed=cfg.seed)
        if isinstance(base, SyncedSharedBase):
            base.extra["fake"] = list(head.parameters())  # trained in the fake backward: averaged with it
    if device is not None:
        backbone.to(device)
        if head is not None:
            head.to(device)
    return Student(cfg, backbone, base, head)


# --- checkpoints ----------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first.

    Complete = a ``step-XXXXXXXX`` folder (temp folders have other names and are never
    considered) with every file present and a readable ``state.json`` naming the same step.
    """
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _CKPT_NAME.match(name)
        path = os.path.join(root, name)
        if not m or not all(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINT_FILES):
            continue
        try:
            with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
                if json.load(f).get("step") != int(m.group(1)):
                    continue
        except (OSError, ValueError):
            continue
        found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> Optional[tuple[int, str]]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _remove_tree(path: str) -> None:
    """Delete a folder so that no reader ever sees it half-deleted: rename it away first."""
    if not os.path.exists(path):
        return
    trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _replace_dir(tmp: str, final: str) -> None:
    """Atomically swap a finished temp folder in (``os.replace`` refuses non-empty targets)."""
    _remove_tree(final)
    os.replace(tmp, final)


def _lora_state(base: SharedBase, role: str) -> dict[str, torch.Tensor]:
    """The role's LoRA weights, whole and on the CPU (with FSDP a collective: call it on every rank)."""
    from .sharding import full_state_dict

    return full_state_dict(base.adapter_state(role))


def lora_checksum(params: Sequence[nn.Parameter]) -> str:
    """sha256 of the parameters' bytes: equal iff bit-identical (sharded ones whole: a collective)."""
    from .sharding import full

    h = hashlib.sha256()
    for p in params:
        h.update(full(p.detach()).to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


EMA_FILE = "generator_ema.safetensors"  # only in runs with generator_ema > 0


class GeneratorEMA:
    """Exponential moving average of the generator's LoRA weights (Polyak averaging).

    After every generator update, ``ema <- d * ema + (1 - d) * w`` per tensor. The live weights
    keep training; :meth:`applied` swaps the average in for sampling and export. Why: on the toy
    a 200-update run's FD moves by tens between checkpoints ten updates apart (91 at step 180,
    172 at step 200 for one run, docs/RESULTS.md), so the last weights are a noisy pick.
    Under FSDP the averages are shards like the parameters, so the update needs no collective.
    """

    def __init__(self, base: SharedBase, decay: float, init: Optional[Sequence[torch.Tensor]] = None):
        from torch.distributed.tensor import distribute_tensor

        from .sharding import is_sharded

        self.base, self.decay = base, float(decay)
        self.params = base.parameters("generator")
        if init is None:
            init = [p.detach() for p in self.params]
        # ``init`` is whole tensors (from a checkpoint); a sharded parameter gets its own shard of it
        self.shadow = [distribute_tensor(t.to(p.device), p.device_mesh, p.placements).detach()
                       if is_sharded(p) and not is_sharded(t) else t.detach().clone().to(p.device)
                       for t, p in zip(init, self.params)]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the generator's parameters inside the block; the live ones after."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, live):
                    p.copy_(w)

    def state(self) -> dict[str, torch.Tensor]:
        """The average as a generator LoRA state dict (checkpoint layout; with FSDP a collective)."""
        with self.applied():
            # copies: on the CPU the state dict's tensors are the parameters themselves, swapped back below
            return {k: v.clone() for k, v in _lora_state(self.base, "generator").items()}


CHECKPOINT_PAUSE_ENV = "RMD_CHECKPOINT_PAUSE"  # seconds between writing a checkpoint and publishing it (tests)


def gather_training_state(student: Student, opt_g: torch.optim.Optimizer, opt_f: torch.optim.Optimizer,
                          ema: Optional[GeneratorEMA] = None) -> dict[str, Any]:
    """Both LoRAs, both optimiser states and the generator's EMA (if on), whole, on the CPU: what a
    checkpoint holds (call on every rank)."""
    from .sharding import full_optimizer_state

    return {"lora": {role: _lora_state(student.base, role) for role in ("generator", "fake")},
            "optimizer": {"generator": full_optimizer_state(opt_g), "fake": full_optimizer_state(opt_f)},
            "ema": ema.state() if ema is not None else None}


def save_checkpoint(run_dir: str, step: int, student: Student, gathered: dict[str, Any], extra: dict[str, Any]) -> str:
    """Write ``checkpoints/step-XXXXXXXX`` atomically: into a temp folder, then ``os.replace``.

    ``gathered`` is :func:`gather_training_state`'s result (whole tensors, also under FSDP).
    """
    from safetensors.torch import save_file

    root = os.path.join(run_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, checkpoint_name(step))
    tmp = os.path.join(root, f".tmp-{checkpoint_name(step)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for role in ("generator", "fake"):
        save_file(gathered["lora"][role], os.path.join(tmp, f"{role}.safetensors"), metadata={"format": "pt"})
    if gathered.get("ema") is not None:
        save_file(gathered["ema"], os.path.join(tmp, EMA_FILE), metadata={"format": "pt"})
    if student.head is not None:  # its optimiser state is in opt_f's (it is trained with the fake score)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in student.head.state_dict().items()},
                  os.path.join(tmp, HEADS_FILE), metadata={"format": "pt"})
    torch.save(gathered["optimizer"], os.path.join(tmp, "optimizer.pt"))
    write_config(student.cfg, os.path.join(tmp, "config.yaml"))
    state = {"step": step, "rng": "none needed: iteration i on rank r draws only from (seed, i, r)", **extra}
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:  # written last
        json.dump(state, f, indent=1)
    _fsync_tree(tmp)  # the rename below must not reach the disk before the files it publishes
    pause = float(os.environ.get(CHECKPOINT_PAUSE_ENV, "0") or 0)
    if pause > 0:  # fault injection: crash-safety tests kill the run inside this window
        time.sleep(pause)
    _replace_dir(tmp, final)
    return final


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(run_dir: str, keep_last: int) -> None:
    for _, path in complete_checkpoints(run_dir)[:-keep_last]:
        _remove_tree(path)


def load_lora_weights(base: SharedBase, role: str, path: str, prefix: Optional[str] = None) -> None:
    """Load a LoRA safetensors file (checkpoint or export layout) into ``role``; unknown keys are an error."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(p.device for p in base.parameters(role))
    state = load_file(path, device=str(device))
    if prefix:
        state = {k[len(prefix) + 1:] if k.startswith(prefix + ".") else k: v for k, v in state.items()}
    expected = set(base.adapter_state(role))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise _user_error(f"{path} does not fit this model's {role} LoRA (missing {missing}, unexpected {unexpected}); "
                          "was it written with another lora_rank / lora_targets?")
    set_peft_model_state_dict(base.model, state, adapter_name=role)
    base.role(base.current)  # set_peft_model_state_dict may touch requires_grad; restore the invariant


def load_checkpoint(path: str, student: Student, opt_g: Optional[torch.optim.Optimizer] = None,
                    opt_f: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
    """Restore both roles' LoRA weights (and the optimiser states, if given); returns state.json."""
    for role in ("generator", "fake"):
        load_lora_weights(student.base, role, os.path.join(path, f"{role}.safetensors"))
    if student.head is not None:
        from safetensors.torch import load_file

        heads = os.path.join(path, HEADS_FILE)
        if not os.path.isfile(heads):
            raise _user_error(f"{path} has no {HEADS_FILE}: it was written without the GAN head (gan_weight 0)")
        device = next(student.head.parameters()).device
        student.head.load_state_dict(load_file(heads, device=str(device)))
    if opt_g is not None and opt_f is not None:
        load_optimizer_states(path, opt_g, opt_f)
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        return json.load(f)


def load_optimizer_states(path: str, opt_g: torch.optim.Optimizer, opt_f: torch.optim.Optimizer) -> None:
    """Both optimiser states of a checkpoint (whole tensors) into optimisers over plain or sharded parameters."""
    from .sharding import load_optimizer_state

    opt = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    load_optimizer_state(opt_g, opt["generator"])
    load_optimizer_state(opt_f, opt["fake"])


# --- exports --------------------------------------------------------------------------------


def merged_copy(base: SharedBase, role: str = "generator") -> nn.Module:
    """A standalone copy of the base network with ``role``'s LoRA merged in (W + (alpha / r) B A).

    Works on a deep copy, so the live model keeps both adapters and the run can continue.
    """
    prev = base.current
    base.role(role)  # copy with the role active, so the copy's adapter state is the role's
    try:
        model = copy.deepcopy(base.model)
    finally:
        base.role(prev)
    others = [name for name in model.peft_config if name != role]
    if others:
        model.delete_adapters(others)
    model.fuse_lora(adapter_names=[role])
    model.unload_lora()
    return model.requires_grad_(False).eval()


def merged_from_state(student: Student, state: dict[str, torch.Tensor], role: str = "generator") -> nn.Module:
    """A fresh, unsharded base network (``Backbone.fresh_model``) with ``state`` merged in as ``role``'s LoRA.

    The export path of sharded (FSDP) runs, whose live network cannot be deep-copied whole.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    from .roles import with_adapter_methods

    if student.backbone.fresh_model is None:
        raise RuntimeError(f"backbone {student.backbone.name!r} has no fresh_model loader: cannot export a sharded run")
    model = with_adapter_methods(student.backbone.fresh_model()).requires_grad_(False)
    config = student.base.model.peft_config[role].to_dict()
    model.add_adapter(LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}),
                      adapter_name=role)
    set_peft_model_state_dict(model, state, adapter_name=role)
    model.fuse_lora(adapter_names=[role])
    model.unload_lora()
    return model.eval()


def export_generator(run_dir: str, student: Student, state: Optional[dict[str, torch.Tensor]] = None) -> dict[str, str]:
    """Write the generator as a diffusers-layout LoRA and as a merged full model (each atomically).

    ``state``: the generator's LoRA, gathered on every rank beforehand (required when the model is sharded).
    """
    from .sharding import model_is_sharded

    sharded = model_is_sharded(student.base.model)
    if state is None:
        state = _lora_state(student.base, "generator")
    root = os.path.join(run_dir, "export")
    os.makedirs(root, exist_ok=True)
    paths = {"lora": os.path.join(root, "generator_lora"), "full": os.path.join(root, "generator_full")}
    bb = student.backbone

    tmp = os.path.join(root, f".tmp-generator_lora-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = student.base.model.peft_config["generator"].to_dict()
    bb.save_lora(state, meta, tmp)
    _replace_dir(tmp, paths["lora"])

    tmp = os.path.join(root, f".tmp-generator_full-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = merged_from_state(student, state) if sharded else merged_copy(student.base, "generator").to("cpu")
    bb.save_full(merged, tmp)
    del merged
    from ..pipeline import write_cascade_info

    write_cascade_info(tmp, student.cfg)  # the folder is then a complete RMDPipeline
    _replace_dir(tmp, paths["full"])
    return paths


# --- sampling grids -------------------------------------------------------------------------


@torch.no_grad()
def sample_images(student: Student, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
    """The generator's cascade (Algorithm 2) with the run's sampling settings; images in [-1, 1]."""
    from ..sampler import sample_with

    cfg, bb = student.cfg, student.backbone
    with student.base.as_role("generator"):
        return sample_with(student.denoiser(), cfg.plan(), cfg.sampling, bb.encode, prompts, seeds,
                           num_frames=cfg.frames, decode=bb.decode)


def image_grid(images: torch.Tensor, nrow: int = 4, pad: int = 2):
    """(B, 3, H, W) in [-1, 1] -> a PIL image, ``nrow`` images per row.

    Videos (B, 3, T, H, W) become one row of frames per video (at most 8 frames, evenly spaced).
    """
    from PIL import Image

    if images.ndim == 5:
        b, c, t = images.shape[:3]
        keep = torch.linspace(0, t - 1, min(t, 8)).round().long()
        frames = images[:, :, keep].transpose(1, 2)  # (B, T', 3, H, W)
        return image_grid(frames.reshape(-1, c, *images.shape[-2:]), nrow=len(keep), pad=pad)
    imgs = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, _, h, w = imgs.shape
    if b == 1:
        return Image.fromarray(imgs[0].permute(1, 2, 0).numpy())
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    canvas = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y: y + h, x: x + w] = imgs[i]
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


# --- the loop -------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out_dir: str
    start_step: int
    final_step: int
    metrics: list[dict[str, Any]]  # the lines written by this call (rank 0; empty elsewhere)
    exports: dict[str, str]
    stopped: Optional[str] = None  # "SIGTERM" (or the signal's name) when a signal ended the run early


def iteration_rng(seed: int, iteration: int, rank: int) -> random.Random:
    """Everything iteration ``iteration`` draws on ``rank`` comes from here (string seeds hash stably)."""
    return random.Random(f"rmd-distill/{seed}/{iteration}/{rank}")


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep the lines of steps <= ``last_step`` (a crashed run may have logged past its checkpoint)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _run_info(cfg: RunConfig, world: int, status: str, step: int, exports: Optional[dict] = None) -> dict:
    import accelerate
    import diffusers
    import peft

    return {
        "status": status,
        "step": step,
        "config": cfg.to_dict(),
        "method": cfg.method,
        "method_config": cfg.method_config.model_dump(mode="json"),
        "plan": cfg.plan().to_dict(),
        "world_size": world,
        "exports": exports or {},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                     "accelerate": accelerate.__version__},
    }


def _decide_start(out: str, cfg: RunConfig, resume: bool,
                  overwrite: bool = False) -> tuple[int, Optional[str], Optional[str]]:
    """(start step, checkpoint path, error message) -- decided on rank 0, broadcast to all."""
    if overwrite:
        return 0, None, None  # the old run is deleted once the new one is known to start
    latest = latest_checkpoint(out)
    has_run = latest is not None or os.path.exists(os.path.join(out, "metrics.jsonl"))
    if not resume:
        if has_run:
            return 0, None, (f"{out} already holds a run; pass --resume to continue it, --overwrite to start it "
                             "again (its checkpoints are deleted), or choose another --out")
        return 0, None, None
    if latest is None:
        return 0, None, None  # nothing to resume: start from step 0
    step, path = latest
    old = load_run_config(os.path.join(path, "config.yaml"))
    diff = config_differences(old, cfg)
    if diff:
        return 0, None, (f"cannot resume {out}: the config differs from its checkpoint in {diff}; only "
                         f"{', '.join(sorted(LOGISTIC_KEYS))} may change")
    if step > cfg.max_steps:
        return 0, None, f"cannot resume {out}: its checkpoint is at step {step}, beyond --max-steps {cfg.max_steps}"
    return step, path, None


def train(cfg: RunConfig, out_dir: str, *, resume: bool = False, progress: bool = True,
          on_step: Optional[Callable[[dict[str, Any]], None]] = None, overwrite: bool = False) -> TrainResult:
    """Run (or resume) a distillation into ``out_dir``; see the module docstring for the folder layout.

    ``on_step(metrics)`` is called on every rank after each iteration (tests use it to
    simulate a crash). Launch several processes with ``accelerate launch`` / ``torchrun``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    # accelerate only forms a multi-process group without a GPU when told cpu=True (gloo); with a
    # GPU, or in one process, it picks the device itself
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Mixed precision comes from the run config (torch.autocast below), not from accelerate's process-wide
    # state, which cannot change within a process and would make the config a partial truth.
    acc = Accelerator(cpu=multi and not torch.cuda.is_available())
    if acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU,
                                    DistributedType.FSDP):
        raise _user_error(f"distributed type {acc.distributed_type} is not supported: launch plain processes "
                          "(DDP-style), or FSDP (an accelerate FSDP config, or sharding: fsdp in the run config)")
    rank, world, is_main = acc.process_index, acc.num_processes, acc.is_main_process
    # FSDP is applied by rmd itself (rmd.distill.sharding), after the adapters exist; accelerate's
    # FSDP plugin settings (wrap policy, ...) are not read. One process has nothing to shard.
    sharded = (cfg.sharding == "fsdp" or acc.distributed_type == DistributedType.FSDP) and world > 1
    out = os.path.abspath(out_dir)
    metrics_path = os.path.join(out, "metrics.jsonl")

    decision: list[Any] = [None]
    if is_main:
        try:
            decision[0] = _decide_start(out, cfg, resume, overwrite)
        except (PlanError, OSError) as e:  # e.g. an unreadable checkpoint config: every rank must hear of it
            decision[0] = (0, None, f"cannot resume {out}: {e}")
    if world > 1:
        broadcast_object_list(decision, from_process=0)
    start, ckpt_path, error = decision[0]
    if error:
        raise _user_error(error)

    # built before anything in the folder changes: a bad teacher or resolution fails here
    student = build_student(cfg, acc.device)
    if is_main:
        if overwrite:
            remove_run(out)
        os.makedirs(out, exist_ok=True)
        for root in (os.path.join(out, CHECKPOINTS), os.path.join(out, "export")):
            for name in os.listdir(root) if os.path.isdir(root) else []:
                if name.startswith((".tmp-", ".trash-")):  # left by an interrupted write: never loaded
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        write_config(cfg, os.path.join(out, "config.yaml"))
        _write_json(os.path.join(out, "run.json"), _run_info(cfg, world, "running", start))
        _truncate_metrics(metrics_path, start)
    acc.wait_for_everyone()
    base, bb = student.base, student.backbone
    plan, method = cfg.plan(), MethodConfig(**cfg.method_config.model_dump())
    ema_init = None
    if ckpt_path is not None:
        if cfg.generator_ema > 0:
            ema_path = os.path.join(ckpt_path, EMA_FILE)
            if not os.path.isfile(ema_path):
                raise _user_error(f"cannot resume {out}: {ckpt_path} has no {EMA_FILE} although generator_ema is "
                                  f"{cfg.generator_ema}; resume with the config it was written with")
            # read through the generator's own parameters, so the file's keys are matched as a checkpoint's
            # generator file is; load_checkpoint then puts the live weights back over it
            load_lora_weights(base, "generator", ema_path)
            ema_init = [p.detach().clone() for p in base.parameters("generator")]
        load_checkpoint(ckpt_path, student)  # whole tensors, before any sharding
    else:
        broadcast_params(student.trained_params())
    if sharded:
        from .sharding import shard_model

        shard_model(base.model)  # the parameters are now DTensors: the optimisers are built over those
    opt_g = torch.optim.AdamW(base.parameters("generator"), lr=cfg.generator_lr, betas=cfg.adam_betas,
                              weight_decay=cfg.weight_decay)
    # the GAN head (if any) is trained with the fake score, by the same optimiser (as in DMD2)
    opt_f = torch.optim.AdamW(base.parameters("fake") + student.head_params(), lr=cfg.fake_lr, betas=cfg.adam_betas,
                              weight_decay=cfg.weight_decay)
    if ckpt_path is not None:
        load_optimizer_states(ckpt_path, opt_g, opt_f)
    ema = GeneratorEMA(base, cfg.generator_ema, ema_init) if cfg.generator_ema > 0 else None
    averaged = ema.applied if ema is not None else nullcontext  # what sampling and export see
    uncond = bb.encode([""]).to(acc.device)

    writer = None
    metrics_file = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start + 1 if start else None)
        metrics_file = open(metrics_path, "a", encoding="utf-8")
    sample_prompts = bb.sample_prompts(cfg.num_sample_images)
    logged: list[dict[str, Any]] = []
    bad_streak, bad_total, stopped = 0, 0, None
    last_saved = start
    received: list[int] = []
    previous_handler: Any = signal.SIG_DFL
    installed = False
    if threading.current_thread() is threading.main_thread():
        # what schedulers send before they kill: finish the iteration, save, exit cleanly
        def on_term(signum: int, frame: Any) -> None:
            received.append(signum)
            signal.signal(signal.SIGTERM, previous_handler)  # a second SIGTERM is not deferred again

        previous_handler = signal.signal(signal.SIGTERM, on_term)
        if previous_handler is None:  # installed outside Python: its behaviour is the default one
            previous_handler = signal.SIG_DFL
        installed = True

    def checkpoint(step: int, line: dict[str, Any]) -> None:
        sums = gather_object([lora_checksum(student.trained_params())]) if world > 1 else \
            [lora_checksum(student.trained_params())]
        if len(set(sums)) > 1:
            raise RuntimeError(f"ranks out of sync at step {step}: LoRA checksums {sums}")
        # sharded: every rank takes part in gathering the whole tensors; else rank 0 reads its own
        gathered = gather_training_state(student, opt_g, opt_f, ema) if (is_main or sharded) else None
        if is_main:
            save_checkpoint(out, step, student, gathered, {"world_size": world, "rank_checksums": sums,
                                                           "sharding": "fsdp" if sharded else "none", "metrics": line})
            prune_checkpoints(out, cfg.keep_last)
        acc.wait_for_everyone()

    bar = tqdm(total=cfg.max_steps, initial=start, desc=f"distill {cfg.method}", disable=not (progress and is_main),
               dynamic_ncols=True)
    try:
        for it in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            rng = iteration_rng(cfg.seed, it, rank)
            torch.manual_seed(rng.randrange(2**63))  # anything drawing from the global RNG is seeded too
            real = None
            if method.needs_real:  # GAN / PDM: prompts with real samples for them
                prompts, real = bb.train_batch(cfg.batch_size, rng)
                real = real.to(acc.device)
            else:
                prompts = bb.train_prompts(cfg.batch_size, rng)
            cond = bb.encode(prompts).to(acc.device)  # once per batch, no gradients (the cache gives CPU rows)
            with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
                # Several processes share one stage and step per iteration, as Algorithm 1 draws one for the
                # whole batch; under FSDP it is also required (every network call is a collective, and the
                # backward simulation's length depends on the step). Prompts and noise stay per rank.
                shared = iteration_rng(cfg.seed, it, 0).randrange(2**63) if world > 1 else None
                res = distill_iteration(base, bb.make_denoiser, plan, cond, uncond, method, it, rng.randrange(2**63),
                                        opt_g, opt_f, cfg.stage_loss_weights, cfg.grad_clip, real=real,
                                        head=student.head, schedule_seed=shared)
            if ema is not None:
                ema.update()
            step = it + 1
            extras = res.extras()
            local = torch.tensor([[res.loss_generator, res.loss_fake, res.dm_norm, *extras.values()]],
                                 dtype=torch.float64, device=acc.device)
            every = acc.gather(local).cpu() if world > 1 else local.cpu()  # (world, 3 + extras)
            mean = every.mean(0).tolist()
            line: dict[str, Any] = {
                "step": step, "loss_generator": mean[0], "loss_fake": mean[1], "stage": res.stage,
                "step_index": res.step, "dm_norm": mean[2], "lr": opt_g.param_groups[0]["lr"],
                "lr_fake": opt_f.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 4),
                **dict(zip(extras, mean[3:])),  # GAN / PDM losses, when on
            }
            if world > 1:  # losses above are rank means; stage / step_index are shared by the ranks
                line["loss_generator_per_rank"] = every[:, 0].tolist()
                line["loss_fake_per_rank"] = every[:, 1].tolist()
            # gradients are averaged before the finiteness check, so every rank skips the same updates
            bad_streak = bad_streak + 1 if res.faulty else 0
            bad_total += res.faulty
            line.update(skipped_generator=int(res.skipped_generator), skipped_fake=res.skipped_fake,
                        faulty_iterations=bad_total)
            if is_main:
                metrics_file.write(json.dumps(line) + "\n")
                metrics_file.flush()
                for key in ("loss_generator", "loss_fake", "dm_norm", "stage", "step_index", "lr", "seconds", *extras):
                    writer.add_scalar(f"train/{key}", line[key], step)
                bar.set_postfix(loss_g=f"{line['loss_generator']:.4g}", loss_f=f"{line['loss_fake']:.4g}",
                                stage=res.stage + 1, refresh=False)
                bar.update(1)
                logged.append(line)
            if cfg.sample_every and step % cfg.sample_every == 0 and (is_main or sharded):
                with averaged():
                    _write_samples(out, student, sample_prompts, step, writer if is_main else None, write=is_main)
            if res.faulty and is_main:
                bar.write(f"step {step}: non-finite loss or gradient, update skipped "
                          f"({bad_streak} in a row, {bad_total} in this run)")
            if bad_streak >= cfg.max_bad_steps:
                if is_main:
                    _write_json(os.path.join(out, "run.json"), _run_info(cfg, world, "failed", last_saved))
                latest = latest_checkpoint(out)
                kept = f"the last good checkpoint is {latest[1]}" if latest else "no checkpoint was written yet"
                raise _user_error(
                    f"training stopped at step {step}: {bad_streak} iterations in a row had a non-finite loss or "
                    f"gradient (their updates were skipped); {kept}. Start again (--overwrite, or another --out) "
                    "with a lower generator_lr / fake_lr or mixed_precision: no, or continue with --resume and a "
                    "larger max_bad_steps (--set max_bad_steps=N)")
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                checkpoint(step, line)
                last_saved = step
            if on_step is not None:
                on_step(line)
            signalled = torch.tensor([float(bool(received))], device=acc.device)
            if world > 1:  # a signal reaching only some ranks still stops all of them at the same step
                torch.distributed.all_reduce(signalled, op=torch.distributed.ReduceOp.MAX)
            if signalled.item() > 0 and step < cfg.max_steps:
                if last_saved != step:
                    checkpoint(step, line)
                    last_saved = step
                stopped = signal.Signals(received[0]).name if received else "signal on another rank"
                break
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()
        if installed:
            signal.signal(signal.SIGTERM, previous_handler)

    if stopped is not None:
        if is_main:
            _write_json(os.path.join(out, "run.json"), _run_info(cfg, world, "stopped", last_saved))
        acc.wait_for_everyone()
        return TrainResult(out, start, last_saved, logged, {}, stopped)
    final = max(start, cfg.max_steps)
    exports: dict[str, str] = {}
    with averaged():
        state = _lora_state(base, "generator") if sharded else None  # a collective under FSDP
        if is_main:
            exports = export_generator(out, student, state)
    if is_main:
        _write_json(os.path.join(out, "run.json"), _run_info(cfg, world, "finished", final, exports))
    acc.wait_for_everyone()
    return TrainResult(out, start, final, logged, exports)


def _write_samples(out: str, student: Student, prompts: Sequence[str], step: int, writer: Any,
                   write: bool = True) -> None:
    """Sample the grid (every rank, when sharded: each forward is a collective) and write it (``write``)."""
    images = sample_images(student, prompts, seeds=range(len(prompts)))
    if not write:
        return
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    path = os.path.join(out, "samples", f"{checkpoint_name(step)}.png")
    image_grid(images).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    if writer is not None:
        if images.ndim == 5:
            writer.add_video("samples", ((images.clamp(-1, 1) + 1) / 2).transpose(1, 2), step, fps=8)
        else:
            writer.add_images("samples", (images.clamp(-1, 1) + 1) / 2, step)


# --- command line ---------------------------------------------------------------------------


# keys a recipe defines outside its distill section: resolve() sets them from the recipe
RECIPE_LEVEL_KEYS = frozenset({"recipe", "description", "backbone", "teacher_guidance_scale", "teacher_steps", "frames",
                               "schedule", "sampling"})


RUN_ARTIFACTS = ("config.yaml", "run.json", "metrics.jsonl", "tensorboard", "samples", CHECKPOINTS, "export")


def check_writable_folder(folder: str, flag: str = "--out") -> None:
    """A clear error now, not a traceback after minutes of work, when ``folder`` cannot be written."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise _user_error(f"{flag} {folder!r} is a file; give a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise _user_error(f"{flag} {folder!r} is not writable ({e.strerror}); choose another folder") from None


def remove_run(out: str) -> None:
    """Delete the files a run wrote into ``out`` (only those: anything else the user keeps there stays)."""
    for name in RUN_ARTIFACTS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            _remove_tree(path)
        elif os.path.exists(path):
            os.remove(path)


def parse_set_options(items: Sequence[str]) -> dict[str, Any]:
    """``["method_config.gamma=0.5", "batch_size=4"]`` -> ``{"method_config": {"gamma": 0.5}, "batch_size": 4}``.

    Values are read as YAML scalars or lists (``0.5``, ``null``, ``[1, 2]``); the run config's
    validation then names any unknown key or bad value.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise _user_error(f"--set takes KEY=VALUE (e.g. --set method_config.gamma=0.5), got {item!r}")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "method_config"):
            raise _user_error(f"--set {item!r}: only top-level keys and method_config.KEY can be set")
        if parts[0] in RECIPE_LEVEL_KEYS or (parts == ["method_config"]):
            raise _user_error(f"--set {item!r}: {parts[0]} comes from the recipe itself; copy the recipe YAML, "
                              "edit it and pass it with --config FILE (or set method_config.KEY)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise _user_error(f"--set {item!r}: the value is not valid YAML") from None
        if len(parts) == 1:
            out[parts[0]] = value
        else:
            out.setdefault("method_config", {})[parts[1]] = value
    return out


def run_distill_command(args: Any) -> None:
    """``rmd distill --recipe NAME|--config FILE --out DIR [--max-steps N] [--checkpoint-every K] [--resume]
    [--set KEY=VALUE ...]``."""
    if args.recipe and args.config:
        raise _user_error("give --recipe or --config, not both")
    source = args.config or args.recipe
    if source is None:
        own = os.path.join(args.out, "config.yaml")
        if not (args.resume and os.path.isfile(own)):
            raise _user_error("give --recipe NAME (see `rmd recipes`) or --config FILE "
                              "(or --resume on a run folder that has a config.yaml)")
        source = own
    if args.config and not os.path.isfile(args.config):
        raise _user_error(f"--config {args.config!r}: no such file")
    if getattr(args, "overwrite", False) and args.resume:
        raise _user_error("--overwrite starts the run again from step 0 and --resume continues it: give one of them")
    check_writable_folder(args.out)
    overrides = parse_set_options(getattr(args, "set", None) or [])
    overrides.update({k: v for k, v in (("max_steps", args.max_steps), ("checkpoint_every", args.checkpoint_every),
                                        ("teacher", args.teacher), ("prompts", getattr(args, "prompts", None)))
                      if v is not None})
    cfg = load_run_config(source, **overrides)
    result = train(cfg, args.out, resume=args.resume, progress=not args.quiet,
                   overwrite=getattr(args, "overwrite", False))
    if result.stopped:
        print(f"stopped by {result.stopped} at step {result.final_step} after writing a checkpoint; continue with "
              f"`rmd distill --out {args.out} --resume`")
    elif result.metrics:
        last = result.metrics[-1]
        print(f"distilled {cfg.method} steps {result.start_step}..{result.final_step}: loss_generator "
              f"{last['loss_generator']:.4g}, loss_fake {last['loss_fake']:.4g}; run folder {result.out_dir}")
    elif result.exports:
        print(f"nothing left to do (step {result.final_step}); exports refreshed in {result.out_dir}/export")
