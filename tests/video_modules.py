"""Small hand-made video modules for the soundness and verifier tests: spatial conv blocks
over the frames of a (B, C, F, H, W) video, optionally with an op that mixes frames."""
from __future__ import annotations

import torch
import torch.nn.functional as F

FRAME_MIXES = ("flip", "einsum", "cumsum", "index_select")


class VideoBlocks(torch.nn.Module):
    """conv -> (norm, silu, conv) -> [mix] -> (norm, silu, conv), each conv per frame;
    `where` puts the frame-mixing op at the "start", "middle" (twice) or "end"."""

    def __init__(self, mix: str | None = None, where: str = "middle", channels: int = 8) -> None:
        super().__init__()
        self.mix, self.where = mix, where
        self.conv1 = torch.nn.Conv2d(4, channels, 3, padding=1)
        self.norm1 = torch.nn.GroupNorm(4, channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = torch.nn.GroupNorm(4, channels)
        self.conv3 = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.register_buffer("mixer", torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("order", torch.tensor([5, 3, 1, 0, 2, 4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._mixed(x, "start")
        h = self._spatial(h, self.conv1, None)
        h = self._mixed(h, "middle")
        h = self._spatial(h, self.conv2, self.norm1)
        h = self._mixed(h, "middle")
        return self._mixed(self._spatial(h, self.conv3, self.norm2), "end")

    @staticmethod
    def _spatial(x, conv, norm):
        b, c, f, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        y = conv(F.silu(norm(y)) if norm is not None else y)
        return y.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4)

    def _mixed(self, h, where):
        if self.mix is None or where != self.where:
            return h
        if self.mix == "flip":
            return h.flip(2)
        if self.mix == "einsum":
            return torch.einsum("bcfhw,fg->bcghw", h, self.mixer)
        if self.mix == "cumsum":
            return h.cumsum(2)
        return h.index_select(2, self.order)


def video(batch: int = 1, frames: int = 6, size: int = 16, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 4, frames, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)
