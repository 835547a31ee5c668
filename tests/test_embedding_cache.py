"""rmd.embedding_cache: publication is atomic and tolerates a concurrent builder; the key covers what changes rows."""

import json
import os

import pytest
import torch

from rmd.denoisers import Conditioning
from rmd.embedding_cache import EmbeddingCache, build_cache, cache_digest


def _encoder(offset: float):
    def encode(prompts):
        rows = torch.stack([torch.full((3, 4), float(len(p)) + offset) for p in prompts])
        return Conditioning(rows, rows[:, 0])
    return encode


def test_a_second_builder_finding_the_cache_published_keeps_it(tmp_path):
    folder = str(tmp_path / "cache")
    build_cache(folder, ["ab", "abc"], _encoder(0.0))
    # a concurrent job published the same digest first: the loser's work is dropped, not an error
    assert build_cache(folder, ["ab", "abc"], _encoder(100.0)) == folder
    cond = EmbeddingCache(folder).encode(["abc"])
    assert float(cond.embeds.max()) == 3.0  # the first builder's rows
    assert [n for n in os.listdir(tmp_path) if ".tmp" in n] == []


def test_a_non_cache_folder_in_the_way_is_an_error(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OSError):
        build_cache(str(folder), ["ab"], _encoder(0.0))
    assert (folder / "notes.txt").read_text() == "mine"


def test_digest_follows_model_index_prompts_and_settings(tmp_path):
    model = tmp_path / "model"
    (model / "text_encoder").mkdir(parents=True)
    (model / "text_encoder" / "config.json").write_text("{}")
    (model / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": True}))
    key = cache_digest(str(model), ["text_encoder"], ["a"], max_length=77)
    assert key == cache_digest(str(model), ["text_encoder"], ["a"], max_length=77)
    assert key != cache_digest(str(model), ["text_encoder"], ["b"], max_length=77)
    assert key != cache_digest(str(model), ["text_encoder"], ["a"], max_length=64)
    (model / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": False}))
    assert key != cache_digest(str(model), ["text_encoder"], ["a"], max_length=77)


def _sync_rank(rank: int, world: int, port: int, fail: bool, out: str) -> None:
    import torch.distributed as dist

    from rmd.distill.family_backbone import _synchronised

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def build():
        if fail:
            raise PermissionError("cannot write /nowhere")
        open(os.path.join(out, "built"), "w").close()

    try:
        _synchronised(build, is_main=rank == 0)
        outcome = "ok" if os.path.exists(os.path.join(out, "built")) else "not built"
    except Exception as e:  # noqa: BLE001 - the outcome is what the test reads
        outcome = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(outcome)


@pytest.mark.parametrize("fail", [False, True])
def test_a_failed_cache_build_on_rank_0_stops_every_rank_with_its_reason(tmp_path, fail):
    from helpers import run_two_ranks

    run_two_ranks(_sync_rank, fail, str(tmp_path))
    got = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    if not fail:
        assert got == ["ok", "ok"]  # rank 1 read only after rank 0 had built
    else:
        assert got[0] == "PermissionError: cannot write /nowhere"
        assert got[1].startswith("RuntimeError: rank 0 could not build the embedding cache: PermissionError")
