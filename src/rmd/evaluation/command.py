"""``rmd eval``: CLIP score, LAION aesthetic score, HPS v2.1 and FID of a sample folder, from local weights.

Light at import time (``rmd --help`` builds this parser): torch and the metric libraries are
imported only when the command runs. Order of work: every weight file and optional package is
checked first (one error lists all problems), then the input folders (names and sidecars only),
then the models are loaded with the hub switched off, then images are read in batches.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

EPILOG = """\
Sampling is not part of this command: make the samples first with
  rmd sample --run RUN --prompts prompts.jsonl --out samples/
(one NNNNNN.png + NNNNNN.json per prompt), then
  rmd eval --images samples/ --weights-dir ~/rmd-eval-weights --reference coco_val/ --out scores.json
Nothing is ever downloaded: see docs/EVAL.md for the weight files and where to get them.
Video (VBench): rmd eval --videos clips/ --vbench-export vbench_in/  (renames, prints the vbench command)."""


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    ev = subparsers.add_parser(
        "eval", help="CLIP score, aesthetic score, HPS v2.1 and FID of a sample folder, from local weights only; "
                     "VBench hand-off for videos",
        description="Score a folder written by `rmd sample --prompts` (run that first) with the paper's image "
                    "metrics, from local weight files only.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--images", help="sample folder: images (NNNNNN.png) with sidecar NNNNNN.json {\"prompt\": ...}")
    ev.add_argument("--prompts", help="take the prompts from this prompt file instead of the sidecars (image "
                                      "NNNNNN = the file's prompt number NNNNNN, counted from 0)")
    ev.add_argument("--reference", help="folder of real images for FID")
    ev.add_argument("--metrics", help="comma-separated, from clip,aesthetic,hps,fid (default: clip,aesthetic,hps, "
                                      "and fid when --reference is given)")
    ev.add_argument("--weights-dir", help="folder holding the weights under their published names (see "
                                          "docs/EVAL.md); the flags below override single files")
    ev.add_argument("--clip", help="CLIP ViT-L/14 folder in the transformers layout (CLIP score, aesthetic)")
    ev.add_argument("--aesthetic-head", help="LAION aesthetic head, sac+logos+ava1-l14-linearMSE.pth (or .safetensors)")
    ev.add_argument("--hps", help="HPS v2.1 checkpoint, HPS_v2.1_compressed.pt")
    ev.add_argument("--hps-clip", help="(optional) open_clip ViT-H-14 base weights, loaded before --hps")
    ev.add_argument("--hps-arch", default="ViT-H-14", help="open_clip architecture of the HPS model (default ViT-H-14)")
    ev.add_argument("--hps-benchmark", help="folder with the HPSv2 benchmark prompts (anime.json, concept-art.json, "
                                            "paintings.json, photo.json): adds per-category HPS")
    ev.add_argument("--inception", help="FID Inception weights, weights-inception-2015-12-05-6726825d.pth")
    ev.add_argument("--no-verify-hash", action="store_true", help="check only that weight files exist, not their "
                                                                  "published hashes")
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("--out", help="also write the result to this .json file")
    ev.add_argument("--videos", help="with --vbench-export: folder of NNNNNN.mp4 with sidecar JSON prompts")
    ev.add_argument("--vbench-export", metavar="DIR", help="copy --videos to DIR as {prompt}-{k}.mp4 for VBench "
                                                           "and print the `vbench evaluate` command (no scoring)")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=run_eval_command)
    return ev


def _user_error(msg: str) -> Exception:
    from ..cli import UserError

    return UserError(msg)


def _metrics(args) -> list[str]:
    from .runner import METRICS

    if args.metrics is None:
        return ["clip", "aesthetic", "hps"] + (["fid"] if args.reference else [])
    names = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise _user_error(f"--metrics {args.metrics!r}: unknown {bad}; choose from {','.join(METRICS)}")
    return list(dict.fromkeys(names))


def _package_problems(metrics: list[str]) -> list[str]:
    problems = []
    if "hps" in metrics:
        from .hps import import_open_clip

        try:
            import_open_clip()
        except ImportError as e:
            problems.append(f"- {e}")
    if "fid" in metrics:
        try:
            importlib.import_module("torch_fidelity")
        except ImportError as e:
            from .fid import fidelity_import_message

            problems.append(f"- {fidelity_import_message(e)}")
        except Exception as e:
            problems.append(f"- torch-fidelity could not be imported ({type(e).__name__}: {e}); it needs a "
                            "torchvision built for the installed torch")
    return problems


def preflight(args, metrics: list[str]) -> dict:
    """Weights, packages and option checks, all before any image is read; one error lists all problems."""
    from .weights import WeightsError, check_weights, resolve_paths

    if args.batch_size < 1:
        raise _user_error("--batch-size must be at least 1")
    if args.out is not None and not args.out.lower().endswith(".json"):
        raise _user_error(f"--out must be a .json file, got {args.out!r}")
    if "fid" in metrics and not args.reference:
        raise _user_error("fid needs --reference DIR (real images); or leave fid out of --metrics")
    if args.weights_dir is not None and not os.path.isdir(args.weights_dir):
        raise _user_error(f"--weights-dir {args.weights_dir!r} is not a folder")
    given = {"clip": args.clip, "aesthetic_head": args.aesthetic_head, "hps": args.hps, "hps_clip": args.hps_clip,
             "inception": args.inception}
    paths = resolve_paths(metrics, given, args.weights_dir)
    messages, record = [], {}
    try:
        record = check_weights(paths, verify_hash=not args.no_verify_hash)
    except WeightsError as e:
        messages.append(str(e))
    problems = _package_problems(metrics)
    if problems:
        messages.append("missing or broken packages:\n" + "\n".join(problems))
    if messages:
        raise _user_error("\n".join(messages) + f"\n(metrics asked for: {','.join(metrics)}; narrow them with "
                          "--metrics)")
    return {"paths": paths, "record": record}


def run_eval_command(args) -> None:
    from .inputs import InputError

    say = (lambda msg: None) if (args.quiet or args.json) else (lambda msg: print(msg, file=sys.stderr))
    try:
        if args.vbench_export:
            _run_vbench(args)
            return
        if not args.images:
            raise _user_error("give --images DIR (a folder written by `rmd sample --prompts`), or --videos DIR "
                              "--vbench-export DIR for the VBench hand-off")
        metrics = _metrics(args)
        checked = preflight(args, metrics)
        result = _score(args, metrics, checked, say)
    except (InputError, ValueError, ImportError) as e:
        raise _user_error(str(e)) from None
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name, m in result["metrics"].items():
            extra = f" (x100: {m['value']:.3f}; raw {m['value_raw']:.5f})" if name == "hps" else ""
            print(f"{name:10s} {m['value']:.4f}  n={m['n']}{extra}")
            for cat, v in (m.get("per_category") or {}).items():
                print(f"  {cat:12s} {v:.3f}  n={m['n_per_category'][cat]}")
        if args.out:
            print(f"wrote {args.out}")


def _score(args, metrics: list[str], checked: dict, say) -> dict:
    import torch

    from .inputs import list_media, read_samples, require_prompts, IMAGE_SUFFIXES
    from .runner import describe_inputs, evaluate
    from .weights import offline

    samples = read_samples(args.images, args.prompts)
    if {"clip", "hps"} & set(metrics):
        require_prompts(samples, args.images, [m for m in metrics if m in ("clip", "hps")])
    reference = list_media(args.reference, IMAGE_SUFFIXES, "--reference") if "fid" in metrics else None
    categories = None
    if "hps" in metrics and args.hps_benchmark:
        from .hps import read_hps_benchmark

        categories = read_hps_benchmark(args.hps_benchmark)
    paths = checked["paths"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded: dict = {"backbones": {}}
    with offline():
        if {"clip", "aesthetic"} & set(metrics):
            from .clip_metrics import load_aesthetic_head, load_clip

            say(f"loading CLIP from {paths['clip']}")
            loaded["clip"] = load_clip(paths["clip"], device)
            if "aesthetic" in metrics:
                loaded["aesthetic_head"] = load_aesthetic_head(paths["aesthetic_head"])
                loaded["backbones"]["aesthetic"] = {"head_file": os.path.abspath(paths["aesthetic_head"])}
        if "hps" in metrics:
            from .hps import load_hps

            say(f"loading HPS ({args.hps_arch}) from {paths['hps']}")
            loaded["hps"] = load_hps(paths["hps"], paths.get("hps_clip"), args.hps_arch, device)
        if "fid" in metrics:
            from .fid import load_inception

            loaded["inception"] = load_inception(paths["inception"], device)
            loaded["backbones"]["fid"] = {"model": "torch-fidelity FeatureExtractorInceptionV3 (inception-v3-compat)",
                                          "features": "2048 (pool3)", "weights": os.path.abspath(paths["inception"]),
                                          "input": "uint8 RGB, resized to 299x299 inside (TF1 bilinear)"}
        metrics_out = evaluate(samples, metrics, reference=reference, hps_categories=categories,
                               batch_size=args.batch_size, progress=say, **loaded)
    inputs = describe_inputs(args.images, samples, args.prompts, args.reference, len(reference or []))
    inputs.update({"weights": checked["record"], "device": str(device), "hash_verification": not args.no_verify_hash})
    return {"metrics": metrics_out, "inputs": inputs}


def _run_vbench(args) -> None:
    from .inputs import vbench_export

    if not args.videos:
        raise _user_error("--vbench-export needs --videos DIR (the sampled .mp4 files with sidecar JSON prompts)")
    info = vbench_export(args.videos, args.vbench_export, args.prompts)
    if args.json:
        print(json.dumps(info, indent=1))
        return
    print(f"copied {info['videos']} video(s) of {info['prompts']} prompt(s) to {info['out']} as {{prompt}}-{{k}}.mp4")
    print("VBench (custom prompts), in an environment with vbench installed:")
    print("  " + info["command_custom_prompts"])
    print("VBench's own prompt suite (one folder per dimension, 5 videos per prompt):")
    print("  " + info["command_vbench_prompt_suite"])
