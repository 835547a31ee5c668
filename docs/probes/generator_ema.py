"""Probe: what an EMA of the generator does to each toy method over training seeds (docs/RESULTS.md, issue 4).

An EMA does not feed back into training, so one run can keep several: this trains a recipe at
one seed exactly as `rmd distill` does, keeps the generator's average at several decays beside
it, and writes each (and the last weights) as a LoRA file in checkpoint layout. A real run with
``--set generator_ema=D`` exports the same weights as this probe's ``ema_D`` file. Usage, from the
repository root with the package installed:

    python docs/probes/generator_ema.py train RECIPE SEED OUT_DIR      # one run, files OUT_DIR/{last,ema_*}.safetensors
    python docs/probes/generator_ema.py score OUT.json RUN_DIR [RUN_DIR ...]   # 256 images, eval seed 0

``score`` prints a line per (run, weights) and writes the rows with paired-bootstrap FD spreads.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

import rmd.distill.train as trainer
from rmd.distill.config import load_run_config

DECAYS = (0.9, 0.95, 0.98)
WEIGHTS = ("last",) + tuple(f"ema_{d}" for d in DECAYS)


def train_with_averages(recipe: str, seed: int, out: str) -> None:
    single = trainer.GeneratorEMA
    kept = {}

    class Several(single):
        """The trainer's EMA, plus one more average per decay in DECAYS, updated at the same moments."""

        def __init__(self, base, decay, init=None):
            super().__init__(base, decay, init)
            self.others = [single(base, d) for d in DECAYS]
            kept["ema"] = self

        def update(self):
            super().update()
            for e in self.others:
                e.update()

    trainer.GeneratorEMA = Several
    try:
        # generator_ema > 0 only switches the trainer's EMA on; its own decay is not one written out
        cfg = load_run_config(recipe, seed=seed, generator_ema=0.5, sample_every=0)
        trainer.train(cfg, out, progress=False, overwrite=True)
    finally:
        trainer.GeneratorEMA = single
    ema = kept["ema"]
    for e in ema.others:
        save_file(e.state(), os.path.join(out, f"ema_{e.decay}.safetensors"), metadata={"format": "pt"})
    last = {k: v.clone() for k, v in trainer._lora_state(ema.base, "generator").items()}
    save_file(last, os.path.join(out, "last.safetensors"), metadata={"format": "pt"})


def score(out_json: str, runs: list[str]) -> None:
    from rmd.demo import _student_method
    from rmd.toy.evaluate import Row, evaluate_rows, make_eval_set
    from rmd.toy.evaluator import load_evaluator
    from rmd.toy.metrics import paired_fd_bootstrap

    rows = []
    for run in runs:
        cfg = load_run_config(os.path.join(run, "config.yaml"))
        for w in WEIGHTS:
            m = _student_method(f"{os.path.basename(run.rstrip('/'))}:{w}", cfg, os.path.join(run, f"{w}.safetensors"),
                                None, "probe", {})
            rows.append(Row(m.name, m.generate, m.nfe))
    evaluator, eval_set = load_evaluator(), make_eval_set(256, 0)
    results, images = evaluate_rows(rows, evaluator=evaluator, eval_set=eval_set, return_images=True)
    spread = paired_fd_bootstrap({k: evaluator.read(v).features for k, v in images.items()},
                                 evaluator.read(eval_set.reference).features, 100, 0)
    out = []
    for r in results:
        run, w = r["name"].split(":")
        same_run = {o.split(":")[1]: v for o, v in spread[r["name"]]["fd_diff"].items() if o.split(":")[0] == run}
        out.append({"run": run, "weights": w, "alignment": r["alignment"], "fd": r["fd"], "detail": r["detail"],
                    "degraded_rate": r["degraded_rate"], "shape": r["per_attribute"]["shape"],
                    "fd_se": spread[r["name"]]["fd_se"], "fd_minus_same_run": same_run})
        print(f"{run:<22} {w:<9} {r['alignment']:.4f} {r['per_attribute']['shape']:.3f} {r['fd']:7.1f} "
              f"{r['detail']:.2f} {r['degraded_rate']:.3f}", flush=True)
    with open(out_json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(2)
    if len(sys.argv) == 5 and sys.argv[1] == "train":
        train_with_averages(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) >= 4 and sys.argv[1] == "score":
        score(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)
