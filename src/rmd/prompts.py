"""Prompt files: plain text, JSONL or CSV, read and checked before any model is loaded.

* ``.txt`` (or any other suffix): one prompt per line;
* ``.jsonl``: one JSON object per line with ``"prompt"`` and optionally ``"seed"``;
* ``.csv``: a header row with a ``prompt`` column and optionally a ``seed`` column.

Blank lines are skipped (and counted, so the caller can say so). Everything else that is
wrong -- a missing or empty file, bytes that are not UTF-8, a line that is not JSON, a
missing column, an empty or over-long prompt, a seed that is not an integer -- is a
:class:`PromptFileError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Optional

MAX_CHARS = 2000  # far beyond any text encoder's context (CLIP: 77 tokens, T5 in SD3: 256)


class PromptFileError(ValueError):
    """A prompt file that cannot be used as it is; the message says where and how to fix it."""


@dataclass(frozen=True)
class PromptEntry:
    text: str
    seed: Optional[int]  # from the file, if it gives one
    line: int  # 1-based line number in the file


@dataclass(frozen=True)
class PromptFile:
    path: str
    entries: tuple[PromptEntry, ...]
    blank_lines: int

    @property
    def prompts(self) -> list[str]:
        return [e.text for e in self.entries]


def _decode(path: str, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptFileError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as "
                              "UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`") from None
    return text[1:] if text.startswith("\ufeff") else text  # a BOM is not part of the first prompt


def _check_text(path: str, line: int, text: object, max_chars: int) -> str:
    if not isinstance(text, str):
        raise PromptFileError(f"{path}, line {line}: the prompt must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise PromptFileError(f"{path}, line {line}: empty prompt; remove the line or write a prompt")
    if len(text) > max_chars:
        raise PromptFileError(f"{path}, line {line}: the prompt has {len(text)} characters, more than {max_chars}; "
                              "shorten it (text encoders read at most a few hundred tokens)")
    return text


def _check_seed(path: str, line: int, seed: object) -> Optional[int]:
    if seed is None or seed == "":
        return None
    if isinstance(seed, bool):
        raise PromptFileError(f"{path}, line {line}: seed must be a non-negative integer, got {seed!r}")
    try:
        value = int(seed)
        if isinstance(seed, float) and seed != value:
            raise ValueError
    except (TypeError, ValueError):
        raise PromptFileError(f"{path}, line {line}: seed must be a non-negative integer, got {seed!r}") from None
    if value < 0:
        raise PromptFileError(f"{path}, line {line}: seed must be a non-negative integer, got {value}")
    return value


def read_prompt_file(path: str, max_chars: int = MAX_CHARS) -> PromptFile:
    """Read and check a prompt file (format from the suffix: .jsonl, .csv, else one prompt per line)."""
    if not os.path.exists(path):
        raise PromptFileError(f"prompt file {path!r} does not exist; give a .txt (one prompt per line), .jsonl or "
                              ".csv file")
    if os.path.isdir(path):
        raise PromptFileError(f"{path!r} is a folder; give a prompt file (.txt, .jsonl or .csv)")
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    suffix = os.path.splitext(path)[1].lower()
    entries: list[PromptEntry] = []
    blank = 0
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [name.strip() for name in (reader.fieldnames or [])]
        if "prompt" not in fields:
            raise PromptFileError(f"{path}: the first row must be a header with a 'prompt' column (found {fields}); "
                                  "add the header `prompt` (and optionally `seed`)")
        reader.fieldnames = fields
        for row in reader:
            line = reader.line_num
            if all(not (v or "").strip() for v in row.values() if isinstance(v, str)):
                blank += 1
                continue
            entries.append(PromptEntry(_check_text(path, line, row.get("prompt") or "", max_chars),
                                       _check_seed(path, line, (row.get("seed") or "").strip() or None), line))
    else:
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                blank += 1
                continue
            if suffix == ".jsonl":
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{path}, line {line}: not valid JSON ({e.msg}); each line of a .jsonl "
                                          'file is an object like {"prompt": "...", "seed": 0}') from None
                if not isinstance(obj, dict) or "prompt" not in obj:
                    raise PromptFileError(f"{path}, line {line}: expected an object with a \"prompt\" key, got "
                                          f"{raw.strip()[:60]!r}")
                entries.append(PromptEntry(_check_text(path, line, obj["prompt"], max_chars),
                                           _check_seed(path, line, obj.get("seed")), line))
            else:
                entries.append(PromptEntry(_check_text(path, line, raw, max_chars), None, line))
    if not entries:
        what = f"only {blank} blank line(s)" if blank else "nothing"
        raise PromptFileError(f"{path} holds {what}: no prompts; write one prompt per line")
    return PromptFile(path, tuple(entries), blank)


def seeds_for(entries: tuple[PromptEntry, ...] | list[PromptEntry], base_seed: int) -> list[int]:
    """One seed per prompt: the file's own, else ``base_seed + index`` (so a sample never depends on its batch)."""
    return [e.seed if e.seed is not None else base_seed + i for i, e in enumerate(entries)]
