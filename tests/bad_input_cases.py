"""Every bad input the project is known to meet, what the user runs, and what the error must say.

``tests/test_bad_input.py`` runs each case; ``python tests/bad_input_cases.py`` re-runs them and
rewrites ``docs/BAD_INPUT.md`` with the messages users really see.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

Setup = Callable[[str, str], list]  # (scratch folder, tiny teacher folder) -> argv


@dataclass(frozen=True)
class Case:
    group: str
    what: str
    setup: Setup
    expect: str  # a fragment the message must contain (names the problem or the fix)


def _write(path: str, data, mode: str = "w") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(data)
    return path


def _recipe(tmp: str, teacher: str, body: str, name: str = "bad.yaml") -> str:
    head = ("name: bad\nbackbone: toy\nteacher_guidance_scale: 3.0\nteacher_steps: 50\n"
            "schedule:\n  steps: 4\n  resolutions: [16, 32]\n  thresholds: [-2.5]\n")
    return _write(os.path.join(tmp, name), head + f"distill:\n  teacher: {teacher}\n  max_steps: 1\n" + body)


def _variant(tmp: str, teacher: str, old: str, new: str) -> str:
    """A valid recipe with one piece of text replaced."""
    text = open(_recipe(tmp, teacher, "")).read()
    return _write(os.path.join(tmp, "variant.yaml"), text.replace(old, new))


def _distill(tmp: str, config: str, *extra: str) -> list:
    return ["distill", "--config", config, "--out", os.path.join(tmp, "run"), "--quiet", *extra]


def _sample(tmp: str, prompts: str) -> list:
    os.makedirs(os.path.join(tmp, "somerun"), exist_ok=True)
    return ["sample", "--run", os.path.join(tmp, "somerun"), "--prompts", prompts, "--out", os.path.join(tmp, "out")]


def _sample_into_used(tmp: str, teacher: str) -> list:
    """A finished tiny run, and an output folder that already holds sample 000000."""
    from rmd.distill.train import train

    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import small

    run = os.path.join(tmp, "finished")
    train(small("toy-rmd", teacher, max_steps=1), run, progress=False)
    out = os.path.join(tmp, "out")
    _write(os.path.join(out, "000000.png"), "x")
    return ["sample", "--run", run, "--prompts", _write(os.path.join(tmp, "p.txt"), "a red circle\n"), "--out", out]


def _teacher_copy(tmp: str, teacher: str, edit: Callable[[str], None]) -> str:
    dst = os.path.join(tmp, "teacher")
    shutil.copytree(teacher, dst)
    edit(dst)
    return dst


def _edit_transformer(key: str, value) -> Callable[[str], None]:
    def edit(folder: str) -> None:
        path = os.path.join(folder, "transformer", "config.json")
        cfg = json.load(open(path))
        cfg[key] = value
        json.dump(cfg, open(path, "w"))
    return edit


def _tiny_sdxl(tmp: str, edit: Callable[[str], None] = lambda folder: None, family: str = "sdxl") -> str:
    """A tiny complete diffusers pipeline folder (rmd.tiny_pipelines), then ``edit(folder)``."""
    from rmd.tiny_pipelines import save_tiny_pipeline

    folder = save_tiny_pipeline(family, os.path.join(tmp, "model"))
    edit(folder)
    return folder


def _edit_json(component: str, key: str, value) -> Callable[[str], None]:
    def edit(folder: str) -> None:
        path = os.path.join(folder, component, "config.json") if component else os.path.join(folder, "model_index.json")
        cfg = json.load(open(path))
        cfg[key] = value
        json.dump(cfg, open(path, "w"))
    return edit


def _drop_component(name: str) -> Callable[[str], None]:
    def edit(folder: str) -> None:
        shutil.rmtree(os.path.join(folder, name))
    return edit


def _drop_weights(name: str) -> Callable[[str], None]:
    def edit(folder: str) -> None:
        for f in os.listdir(os.path.join(folder, name)):
            if f.endswith(".safetensors"):
                os.remove(os.path.join(folder, name, f))
    return edit


def _real(tmp: str, model: str, *extra: str, prompts: bool = True) -> list:
    """``rmd distill --recipe sdxl --model MODEL [--prompts p.txt]``."""
    argv = ["distill", "--recipe", "sdxl", "--model", model, "--out", os.path.join(tmp, "run"), "--quiet", *extra]
    return argv + (["--prompts", _write(os.path.join(tmp, "p.txt"), "a red cat\n")] if prompts else [])


def _used_folder(tmp: str, teacher: str) -> list:
    run = os.path.join(tmp, "run")
    _write(os.path.join(run, "metrics.jsonl"), '{"step": 1}\n')
    return ["distill", "--recipe", "toy-rmd", "--teacher", teacher, "--out", run, "--quiet"]


CASES = [
    # --- config files -----------------------------------------------------------------------
    Case("config", "unknown key in a recipe", lambda t, te: _distill(t, _recipe(t, te, "  batchsize: 4\n")),
         "batchsize"),
    Case("config", "wrong type", lambda t, te: _distill(t, _recipe(t, te, "  batch_size: eight\n")), "batch_size"),
    Case("config", "impossible schedule (a stage gets no step)",
         lambda t, te: _distill(t, _variant(t, te, "[-2.5]", "[3.0]")), "get no step"),
    Case("config", "not YAML", lambda t, te: _distill(t, _write(os.path.join(t, "x.yaml"), "name: [unclosed\n")),
         "not valid YAML"),
    Case("config", "config file missing", lambda t, te: _distill(t, os.path.join(t, "nope.yaml")), "no such file"),
    Case("config", "--set with an unknown key",
         lambda t, te: ["distill", "--recipe", "toy-rmd", "--out", os.path.join(t, "run"), "--set", "gama=0.5"],
         "gama"),
    Case("config", "--set of a recipe-level key",
         lambda t, te: ["distill", "--recipe", "toy-rmd", "--out", os.path.join(t, "run"), "--set",
                        "schedule=x"], "--config FILE"),
    Case("config", "unknown recipe name",
         lambda t, te: ["distill", "--recipe", "toy-rdm", "--out", os.path.join(t, "run")], "toy-rdm"),
    # --- prompt files -------------------------------------------------------------------------
    Case("prompts", "prompt file missing", lambda t, te: _sample(t, os.path.join(t, "nope.txt")), "does not exist"),
    Case("prompts", "empty prompt file", lambda t, te: _sample(t, _write(os.path.join(t, "p.txt"), "")),
         "no prompts"),
    Case("prompts", "only blank lines", lambda t, te: _sample(t, _write(os.path.join(t, "p.txt"), "\n  \n\n")),
         "blank line"),
    Case("prompts", "not UTF-8", lambda t, te: _sample(t, _write(os.path.join(t, "p.txt"),
                                                                  "a red circle\ncaf\xe9 au lait\n".encode("latin-1"),
                                                                  "wb")), "not UTF-8"),
    Case("prompts", "a very long line",
         lambda t, te: _sample(t, _write(os.path.join(t, "p.txt"), "a red circle\n" + "word " * 1000 + "\n")),
         "line 2"),
    Case("prompts", "JSONL line that is not JSON",
         lambda t, te: _sample(t, _write(os.path.join(t, "p.jsonl"), '{"prompt": "a"}\n{prompt: b}\n')),
         "line 2: not valid JSON"),
    Case("prompts", "JSONL object without a prompt",
         lambda t, te: _sample(t, _write(os.path.join(t, "p.jsonl"), '{"text": "a"}\n')), '"prompt" key'),
    Case("prompts", "negative seed", lambda t, te: _sample(t, _write(os.path.join(t, "p.jsonl"),
                                                                      '{"prompt": "a", "seed": -3}\n')),
         "non-negative integer"),
    Case("prompts", "CSV without a prompt column",
         lambda t, te: _sample(t, _write(os.path.join(t, "p.csv"), "text,seed\na red circle,1\n")), "'prompt' column"),
    Case("prompts", "a prompt folder instead of a file", lambda t, te: _sample(t, t), "is a folder"),
    # --- model folders ------------------------------------------------------------------------
    Case("model", "teacher folder missing components",
         lambda t, te: ["distill", "--recipe", "toy-rmd", "--teacher", _write(os.path.join(t, "empty", "x"), "") and
                        os.path.join(t, "empty"), "--out", os.path.join(t, "run"), "--quiet"], "lacks"),
    Case("model", "teacher of the wrong class",
         lambda t, te: ["distill", "--recipe", "toy-rmd", "--teacher",
                        _teacher_copy(t, te, _edit_transformer("_class_name", "UNet2DConditionModel")),
                        "--out", os.path.join(t, "run"), "--quiet"], "SD3Transformer2DModel"),
    Case("model", "channel count that does not match the recipe",
         lambda t, te: ["distill", "--recipe", "toy-rmd", "--teacher",
                        _teacher_copy(t, te, _edit_transformer("in_channels", 4)),
                        "--out", os.path.join(t, "run"), "--quiet"], "3 and 3"),
    # --- real model folders (rmd distill --recipe sdxl --model FOLDER) ------------------------
    Case("model", "real recipe without --model",
         lambda t, te: ["distill", "--recipe", "sdxl", "--out", os.path.join(t, "run")], "give --model PATH"),
    Case("model", "not a diffusers pipeline folder", lambda t, te: _real(t, _write(os.path.join(t, "m", "x"), "")
                                                                          and os.path.join(t, "m")),
         "no readable model_index.json"),
    Case("model", "a component missing", lambda t, te: _real(t, _tiny_sdxl(t, _drop_component("text_encoder_2"))),
         "text_encoder_2 (text encoder 2): the folder text_encoder_2/ is missing"),
    Case("model", "a component without weights", lambda t, te: _real(t, _tiny_sdxl(t, _drop_weights("unet"))),
         "unet/ holds no weights"),
    Case("model", "a folder of another family", lambda t, te: _real(t, _tiny_sdxl(t, family="sd3")),
         "unet (the denoising UNet): missing from model_index.json"),
    Case("model", "a component of the wrong class",
         lambda t, te: _real(t, _tiny_sdxl(t, _edit_json("", "vae", ["diffusers", "AutoencoderTiny"]))),
         "names AutoencoderTiny, expected AutoencoderKL"),
    Case("model", "latent channels that do not fit the VAE",
         lambda t, te: _real(t, _tiny_sdxl(t, _edit_json("unet", "in_channels", 8))),
         "unet.in_channels is 8 but the vae makes 4-channel latents"),
    Case("model", "text widths that do not fit the text encoders",
         lambda t, te: _real(t, _tiny_sdxl(t, _edit_json("unet", "cross_attention_dim", 48))),
         "unet.cross_attention_dim is 48"),
    Case("model", "real recipe without --prompts", lambda t, te: _real(t, _tiny_sdxl(t), prompts=False),
         "give --prompts FILE"),
    # --- resolutions --------------------------------------------------------------------------
    Case("resolution", "a resolution the backbone cannot take (not a multiple of its patch)",
         lambda t, te: _distill(t, _variant(t, te, "[16, 32]", "[15, 30]")),
         "not a multiple of 4"),
    Case("resolution", "a resolution above the backbone's position table",
         lambda t, te: _distill(t, _variant(t, te, "[16, 32]", "[32, 64]")),
         "largest side"),
    # --- output folders -----------------------------------------------------------------------
    Case("output", "--out is a file", lambda t, te: ["distill", "--recipe", "toy-rmd", "--teacher", te, "--out",
                                                     _write(os.path.join(t, "afile"), "x"), "--quiet"], "is a file"),
    Case("output", "--out not writable",
         lambda t, te: ["distill", "--recipe", "toy-rmd", "--teacher", te, "--out", "/proc/rmd-run", "--quiet"],
         "not writable"),
    Case("output", "--out already holds a run", _used_folder, "--overwrite"),
    Case("output", "--overwrite together with --resume",
         lambda t, te: _used_folder(t, te) + ["--overwrite", "--resume"], "give one of them"),
    Case("output", "sample --out already holds these samples",
         lambda t, te: _sample_into_used(t, te), "--overwrite"),
    Case("output", "sample --out is a .png with --prompts",
         lambda t, te: _sample(t, _write(os.path.join(t, "p.txt"), "a red circle\n"))[:-1] + [
             os.path.join(t, "x.png")], "is a folder"),
]


def run_case(case: Case, scratch: str, teacher: str) -> tuple[int, str]:
    """(exit code, stderr) of ``rmd ARGV`` for the case."""
    import contextlib
    import io

    from rmd.cli import main

    argv = case.setup(scratch, teacher)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def write_docs(path: str) -> None:
    import sys
    import tempfile
    import warnings

    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import save_tiny_teacher

    warnings.simplefilter("ignore")
    lines = ["# Bad input: what users see", "",
             "Every row is a test (`tests/test_bad_input.py`); this page is written by "
             "`python tests/bad_input_cases.py` from the messages the commands really print. Each "
             "ends with exit code 2 and no traceback, before any training or sampling starts.", "",
             "| kind | bad input | what the user sees |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        teacher = save_tiny_teacher(os.path.join(root, "tiny-teacher"))
        for i, case in enumerate(CASES):
            scratch = os.path.join(root, f"case{i}")
            os.makedirs(scratch)
            code, err = run_case(case, scratch, teacher)
            msg = err.strip().replace(root, "…").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {case.group} | {case.what} | {msg} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_docs(os.path.join(os.path.dirname(__file__), "..", "docs", "BAD_INPUT.md"))
