"""``rmd eval``: the paper's image metrics (CLIP score, LAION aesthetic v2, HPS v2.1, FID) from local weights.

Modules: :mod:`.weights` (the table of required files, hash checks, offline mode),
:mod:`.inputs` (sample folders, prompts, the VBench hand-off), :mod:`.clip_metrics`,
:mod:`.hps`, :mod:`.fid` (one metric family each), :mod:`.runner` (:func:`~.runner.evaluate`,
metrics on loaded models) and :mod:`.command` (the CLI). Nothing here imports torch at package
import time; see docs/EVAL.md.
"""
