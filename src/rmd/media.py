"""Writing samples: PNG for images, MP4 (H.264 through imageio-ffmpeg) for videos, each atomically."""

from __future__ import annotations

import os

import torch

VIDEO_FPS = 16  # Wan2.1 renders 81 frames as 5 s at 16 fps


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8, channels last: (3, H, W) -> (H, W, 3); (3, T, H, W) -> (T, H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0) if x.ndim == 3 else x.permute(1, 2, 3, 0)


def save_video(video: torch.Tensor, path: str, fps: int = VIDEO_FPS) -> None:
    """Write one (3, T, H, W) video in [-1, 1] as MP4 (needs ``pip install rmd[video]``)."""
    try:
        import imageio.v2 as imageio
    except ImportError:
        from .cli import UserError

        raise UserError("writing MP4 needs imageio and imageio-ffmpeg: pip install 'rmd[video]'") from None
    frames = to_uint8(video).numpy()
    tmp = path + ".tmp.mp4"
    # macro_block_size 1: keep the exact size (the default pads sides to multiples of 16)
    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                            ffmpeg_log_level="error") as w:
        for f in frames:
            w.append_data(f)
    os.replace(tmp, path)


def save_sample(x: torch.Tensor, stem: str) -> str:
    """Write one sample, (3, H, W) as ``stem.png`` or (3, T, H, W) as ``stem.mp4``; returns the path."""
    if x.ndim == 4:
        path = stem + ".mp4"
        save_video(x, path)
        return path
    from PIL import Image

    path = stem + ".png"
    Image.fromarray(to_uint8(x).numpy()).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)
    return path


__all__ = ["VIDEO_FPS", "save_sample", "save_video", "to_uint8"]
