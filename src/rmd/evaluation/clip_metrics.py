"""CLIP score and the LAION aesthetic score v2, from a local transformers CLIP folder.

* CLIP score (torchmetrics' convention): per image ``100 * max(cos(image_emb, text_emb), 0)``
  with the projected embeddings of ``CLIPModel``, averaged over the images. Prompts longer than
  the text tower's context (77 tokens for the real towers) are truncated, as torchmetrics does.
* Aesthetic score (LAION "improved aesthetic predictor", sac+logos+ava1-l14-linearMSE): the MLP
  head applied to the L2-normalised projected CLIP ViT-L/14 image embedding; the head's output
  is the score (roughly 1-10, AVA scale), averaged over the images.

Images are preprocessed by the folder's own CLIP image processor, always its PIL backend
(``CLIPImageProcessorPil`` in transformers 5, ``CLIPImageProcessor`` before), so the numbers do
not depend on whether torchvision happens to be installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _pil_image_processor_class():
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


@dataclass
class CLIPBundle:
    model: Any  # transformers.CLIPModel
    tokenizer: Any
    processor: Any
    device: torch.device
    folder: str

    def backbone(self) -> dict:
        cfg = self.model.config
        return {"model": "transformers CLIPModel", "folder": os.path.abspath(self.folder),
                "name_or_path": getattr(cfg, "_name_or_path", None) or self.folder,
                "vision_hidden_size": cfg.vision_config.hidden_size, "vision_layers": cfg.vision_config.num_hidden_layers,
                "patch_size": cfg.vision_config.patch_size, "image_size": cfg.vision_config.image_size,
                "text_hidden_size": cfg.text_config.hidden_size, "projection_dim": cfg.projection_dim,
                "image_processor": type(self.processor).__name__}

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        """Projected image embeddings (not normalised), float32 on CPU."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model.get_image_features(pixel_values=pixels)
        out = out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object
        return out.float().cpu()

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        max_len = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        out = out if torch.is_tensor(out) else out.pooler_output
        return out.float().cpu()


def load_clip(folder: str, device: str | torch.device = "cpu") -> CLIPBundle:
    """A CLIP model, tokenizer and (PIL) image processor from a local folder; never the hub."""
    from transformers import AutoTokenizer, CLIPModel

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"CLIP folder {folder!r} does not exist (a hub id is not accepted: no downloads)")
    device = torch.device(device)
    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    processor = _pil_image_processor_class().from_pretrained(folder, local_files_only=True)
    return CLIPBundle(model, tokenizer, processor, device, folder)


def clip_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score: 100 * max(cosine, 0) (torchmetrics' CLIPScore convention)."""
    cos = (F.normalize(image_emb, dim=-1) * F.normalize(text_emb, dim=-1)).sum(-1)
    return 100.0 * cos.clamp(min=0)


CLIP_SCALING = ("100 * max(cos(image_embeds, text_embeds), 0) per image, then the mean "
                "(torchmetrics CLIPScore convention); prompts truncated to the text tower's context")


class AestheticHead(nn.Module):
    """LAION improved aesthetic predictor's MLP: Linear-Dropout-Linear-Dropout-Linear-Dropout-Linear-Linear.

    The module indices match the public state dict (``layers.0``, ``layers.2``, ``layers.4``,
    ``layers.6``, ``layers.7``); no activations, as in the published model.
    """

    LINEAR_INDICES = (0, 2, 4, 6, 7)

    def __init__(self, sizes: Sequence[int] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        s = list(sizes)
        self.layers = nn.Sequential(nn.Linear(s[0], s[1]), nn.Dropout(0.2), nn.Linear(s[1], s[2]), nn.Dropout(0.2),
                                    nn.Linear(s[2], s[3]), nn.Dropout(0.1), nn.Linear(s[3], s[4]), nn.Linear(s[4], s[5]))

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def load_aesthetic_head(path: str) -> AestheticHead:
    """The head from a .pth / .safetensors state dict with keys ``layers.{0,2,4,6,7}.{weight,bias}``."""
    sd = _read_state_dict(path)
    expected = {f"layers.{i}.{p}" for i in AestheticHead.LINEAR_INDICES for p in ("weight", "bias")}
    if not isinstance(sd, dict) or set(sd) != expected:
        got = sorted(sd)[:12] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{path} is not a LAION aesthetic head state dict: expected keys {sorted(expected)}, "
                         f"got {got}")
    sizes = [sd["layers.0.weight"].shape[1]] + [sd[f"layers.{i}.weight"].shape[0] for i in AestheticHead.LINEAR_INDICES]
    head = AestheticHead(sizes)
    head.load_state_dict({k: v.float() for k, v in sd.items()})
    return head.eval()


@torch.no_grad()
def aesthetic_scores(head: AestheticHead, image_emb: torch.Tensor) -> torch.Tensor:
    """Head output on the L2-normalised image embeddings, one value per image."""
    if image_emb.shape[-1] != head.in_features:
        raise ValueError(f"the aesthetic head takes {head.in_features}-d embeddings but the CLIP model gives "
                         f"{image_emb.shape[-1]}-d ones; the public head needs CLIP ViT-L/14 (projection_dim 768)")
    return head(F.normalize(image_emb.float(), dim=-1)).squeeze(-1)


AESTHETIC_SCALING = ("head(l2_normalize(CLIP image_embeds)) per image, then the mean; raw head output "
                     "(AVA-like 1-10 scale), no rescaling")
