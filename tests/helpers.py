"""Shared test helpers: a tiny toy teacher written to disk, and run configs shrunk for tests."""

from __future__ import annotations

import json
import os

TINY = dict(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_width=16, text_layers=1)


def save_tiny_teacher(path: str, seed: int = 0) -> str:
    """A randomly initialised one-block toy teacher folder (what ``load_teacher`` reads)."""
    from rmd.toy.teacher import TeacherConfig, build_transformer, save_teacher
    from rmd.toy.text import ToyTextEncoder, ToyTokenizer, build_resampler, build_text_encoder
    from rmd.toy.world import vocabulary

    cfg = TeacherConfig(**TINY, seed=seed)
    tok = ToyTokenizer(vocabulary())
    text = ToyTextEncoder(tok, build_text_encoder(tok, 16, 1, seed=1), build_resampler(cfg.context_tokens, 16, seed=1))
    save_teacher(path, build_transformer(cfg), text, cfg)
    return path


def small(recipe: str, teacher: str, **kw):
    """A recipe's run config shrunk for tests."""
    from rmd.distill.config import load_run_config

    opts = dict(teacher=teacher, batch_size=2, lora_rank=4, sample_every=0, num_sample_images=2)
    return load_run_config(recipe, **{**opts, **kw})


def read_metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tiny_base(layers: int = 2, rank: int = 4):
    """A SharedBase (teacher + generator and fake LoRAs) around a tiny random toy transformer."""
    import warnings

    from rmd.distill.roles import SharedBase
    from rmd.toy.teacher import TeacherConfig, build_transformer

    cfg = TeacherConfig(**{**TINY, "num_layers": layers})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that a second adapter is added on purpose
        return SharedBase(build_transformer(cfg), rank=rank)


def toy_batch(seed: int = 0, size: int = 16):
    """(x, t, cond) for two images of the tiny toy transformer."""
    import torch

    from rmd.denoisers import Conditioning

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size, generator=g)
    cond = Conditioning(torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g))
    return x, torch.tensor([0.3, 0.8]), cond


def perturb(base, role: str, seed: int, scale: float = 0.2) -> None:
    """Move a role's LoRA weights away from their zero-B start (so the roles differ)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.parameters(role):
            p.add_(scale * torch.randn(p.shape, generator=g))


def run_two_ranks(fn, cfg, run: str) -> None:
    """Fork two gloo training processes ``fn(rank, 2, port, cfg, run)``; fail (never hang) after 10 minutes."""
    import socket

    import pytest
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(fn, args=(2, port, cfg, run), nprocs=2, start_method="fork", join=False)
    try:
        for _ in range(60):
            if ctx.join(timeout=10):
                return
        pytest.fail("the two training processes did not finish")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
