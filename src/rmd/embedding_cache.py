"""A text-embedding cache: prompts are encoded once, so text encoders need not stay in memory.

Distillation is data-free: it reads a fixed prompt list (METHOD 5), so every embedding it will
ever need can be computed before training. :func:`build_cache` runs the text encoders over the
unique prompts (plus the empty prompt for CFG) and writes ``embeds`` / ``pooled`` / ``mask``
rows into safetensors shards; :class:`EmbeddingCache` serves them back as
:class:`rmd.denoisers.Conditioning` batches, memory-mapped, one shard open at a time.

The cache folder is named by a digest of everything its contents depend on (the family, the
text encoders' and tokenizers' files, the prompt list, the sequence length and the dtype),
so an edited prompt file or another model gets a new cache, and runs that share both share one.
Location: ``$RMD_CACHE`` or ``~/.cache/rmd``, under ``embeddings/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable, Optional, Sequence

import torch

from .denoisers import Conditioning

SHARD_ROWS = 256
INDEX = "index.json"


def cache_root() -> str:
    return os.path.join(os.environ.get("RMD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rmd"),
                        "embeddings")


def _file_fingerprint(path: str) -> str:
    """Size and mtime of every file under ``path`` (cheap; a changed file changes it)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def cache_digest(model_folder: str, text_components: Sequence[str], prompts: Sequence[str], **settings) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    # model_index.json holds pipeline options that change the rows (SDXL's force_zeros_for_empty_prompt)
    index = os.path.join(model_folder, "model_index.json")
    if os.path.isfile(index):
        with open(index, "rb") as f:
            h.update(f.read())
    for name in text_components:
        sub = os.path.join(model_folder, name)
        if os.path.isdir(sub):
            h.update(name.encode() + _file_fingerprint(sub).encode())
    h.update(json.dumps(list(prompts)).encode())
    return h.hexdigest()[:24]


def build_cache(folder: str, prompts: Sequence[str], encode: Callable[[list[str]], Conditioning],
                batch_size: int = 16, dtype: torch.dtype = torch.float32,
                progress: Optional[Callable[[int], None]] = None) -> str:
    """Encode ``prompts`` (deduplicated, plus "") into ``folder``, atomically; returns ``folder``."""
    from safetensors.torch import save_file

    unique = list(dict.fromkeys([""] + list(prompts)))
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = []
    for s, start in enumerate(range(0, len(unique), SHARD_ROWS)):
        rows = unique[start:start + SHARD_ROWS]
        parts = [encode(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        cond = Conditioning.cat(parts)
        tensors = {"embeds": cond.embeds.to(dtype).contiguous()}
        if cond.pooled is not None:
            tensors["pooled"] = cond.pooled.to(dtype).contiguous()
        if cond.mask is not None:
            tensors["mask"] = cond.mask.to(torch.float32).contiguous()
        name = f"shard-{s:05d}.safetensors"
        save_file(tensors, os.path.join(tmp, name))
        shards.append({"file": name, "rows": len(rows)})
        if progress:
            progress(len(rows))
    with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump({"format": 1, "prompts": unique, "shards": shards, "dtype": str(dtype)}, f)
    try:
        os.replace(tmp, folder)
    except OSError:
        # a concurrent builder (another job on the same prompts and model) published first:
        # same digest, same contents, so its folder serves; anything else is a real error
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(folder, INDEX)):
            raise
    return folder


class EmbeddingCache:
    """Prompt -> conditioning rows from a folder written by :func:`build_cache`."""

    def __init__(self, folder: str):
        with open(os.path.join(folder, INDEX), encoding="utf-8") as f:
            index = json.load(f)
        self.folder = folder
        self.prompts: list[str] = index["prompts"]
        self._where: dict[str, tuple[int, int]] = {}
        self._files = []
        row = 0
        for s, shard in enumerate(index["shards"]):
            self._files.append(os.path.join(folder, shard["file"]))
            for r in range(shard["rows"]):
                self._where[self.prompts[row]] = (s, r)
                row += 1
        self._open: Optional[tuple[int, dict[str, torch.Tensor]]] = None

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._where

    def __len__(self) -> int:
        return len(self.prompts)

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        if self._open is None or self._open[0] != s:
            from safetensors.torch import load_file

            self._open = (s, load_file(self._files[s]))
        return self._open[1]

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """The cached rows of ``prompts`` as one float32 batch (KeyError names an uncached prompt)."""
        rows = []
        for p in prompts:
            if p not in self._where:
                raise KeyError(f"prompt not in the embedding cache {self.folder}: {p[:80]!r}")
            s, r = self._where[p]
            t = self._shard(s)
            rows.append(Conditioning(t["embeds"][r:r + 1].float(),
                                     t["pooled"][r:r + 1].float() if "pooled" in t else None,
                                     t["mask"][r:r + 1] if "mask" in t else None))
        return Conditioning.cat(rows)


__all__ = ["EmbeddingCache", "build_cache", "cache_digest", "cache_root"]
