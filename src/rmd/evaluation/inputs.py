"""What ``rmd eval`` reads: sample folders (with their prompts), reference folders, video hand-off.

A sample folder is what ``rmd sample --run RUN --prompts FILE --out DIR`` writes: ``NNNNNN.png``
plus a sidecar ``NNNNNN.json`` holding at least ``{"prompt": ...}``. Prompts may instead come
from the prompt file itself (``--prompts FILE``): image ``NNNNNN`` takes the file's entry
number ``NNNNNN`` (0-based, blank lines not counted, as ``rmd sample`` numbers them). Only file
names and sidecars are read here; pixels are read later, in batches, by the metrics.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4",)
VBENCH_CUSTOM_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness",
                            "dynamic_degree", "aesthetic_quality", "imaging_quality")


class InputError(ValueError):
    """An input folder or file that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Sample:
    path: str
    prompt: Optional[str]


def list_media(folder: str, suffixes: tuple[str, ...], flag: str) -> list[str]:
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {folder!r} is not a folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(suffixes) and not n.startswith("."))
    if not names:
        raise InputError(f"{flag} {folder!r} holds no {'/'.join(suffixes)} files")
    return [os.path.join(folder, n) for n in names]


def _sidecar_prompt(media_path: str) -> Optional[str]:
    side = os.path.splitext(media_path)[0] + ".json"
    if not os.path.isfile(side):
        return None
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{side}: not readable JSON ({e}); it should hold {{\"prompt\": ...}}") from None
    prompt = meta.get("prompt") if isinstance(meta, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{side}: no \"prompt\" string in it")
    return prompt


def read_samples(folder: str, prompts_file: Optional[str] = None, flag: str = "--images",
                 suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Sample]:
    """The media files of a folder with their prompts (sidecar JSON, or ``prompts_file`` when given)."""
    paths = list_media(folder, suffixes, flag)
    if prompts_file is None:
        return [Sample(p, _sidecar_prompt(p)) for p in paths]
    from ..prompts import PromptFileError, read_prompt_file

    try:
        entries = read_prompt_file(prompts_file).entries
    except PromptFileError as e:
        raise InputError(str(e)) from None
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if all(s.isdigit() for s in stems):
        index = [int(s) for s in stems]
    else:
        index = list(range(len(paths)))  # no numbers in the names: file order
    beyond = [os.path.basename(p) for p, i in zip(paths, index) if i >= len(entries)]
    if beyond:
        raise InputError(f"--prompts {prompts_file} has {len(entries)} prompts but {flag} holds {beyond[0]} "
                         f"(and {len(beyond) - 1} more) beyond them; is it the file the samples were made from?")
    return [Sample(p, entries[i].text) for p, i in zip(paths, index)]


def require_prompts(samples: list[Sample], folder: str, metrics: list[str]) -> list[str]:
    lacking = [s.path for s in samples if s.prompt is None]
    if lacking:
        raise InputError(f"{', '.join(metrics)} need a prompt per image, but {len(lacking)} of {len(samples)} "
                         f"images in {folder} have no sidecar JSON (e.g. {os.path.basename(lacking[0])}); give "
                         "--prompts FILE (the file `rmd sample --prompts` read), or leave these metrics out")
    return [s.prompt for s in samples]  # type: ignore[misc]


def vbench_export(videos: str, out: str, prompts_file: Optional[str] = None) -> dict:
    """Copy the videos of ``videos`` to ``out`` as ``{prompt}-{k}.mp4`` (k = 0, 1, ... per prompt).

    This is the name VBench reads the prompt from (its prompt suite README:
    ``$prompt-$index.mp4``); the returned dict holds the commands to run.
    """
    samples = read_samples(videos, prompts_file, flag="--videos", suffixes=VIDEO_SUFFIXES)
    prompts = require_prompts(samples, videos, ["the VBench hand-off"])
    bad = [p for p in prompts if "/" in p or "\0" in p or len((p + "-999.mp4").encode("utf-8")) > 255]
    if bad:
        raise InputError(f"{len(bad)} prompt(s) cannot be a file name (a '/' or longer than ~245 bytes), e.g. "
                         f"{bad[0][:80]!r}; VBench reads the prompt from the file name")
    if os.path.isdir(out) and os.listdir(out):
        raise InputError(f"--vbench-export {out!r} is not empty; give a new folder")
    os.makedirs(out, exist_ok=True)
    counts: dict[str, int] = {}
    written = []
    for s, p in zip(samples, prompts):
        k = counts.get(p, 0)
        counts[p] = k + 1
        dest = os.path.join(out, f"{p}-{k}.mp4")
        shutil.copyfile(s.path, dest)
        written.append({"from": s.path, "to": dest})
    custom = ("vbench evaluate --videos_path " + _quote(out) + " --dimension " + " ".join(VBENCH_CUSTOM_DIMENSIONS)
              + " --mode=custom_input")
    standard = f"vbench evaluate --videos_path {_quote(out)} --dimension DIMENSION"
    return {"videos": len(written), "prompts": len(counts), "out": os.path.abspath(out), "files": written,
            "command_custom_prompts": custom,
            "command_vbench_prompt_suite": standard,
            "note": "custom prompts: only the six dimensions in the first command accept them; with VBench's own "
                    "prompt suite (5 videos per prompt, one folder per dimension) use the second per dimension"}


def _quote(path: str) -> str:
    import shlex

    return shlex.quote(path)
