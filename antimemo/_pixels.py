"""``PixelEmbedder``: the weights-free image embedding shared by replica search and image dedup.

Bottom layer (torch and :mod:`antimemo._checks` only), so that :mod:`antimemo.functional.replica`
and :mod:`antimemo.dedup.images` (which re-exports it as ``antimemo.dedup.images.PixelEmbedder``)
judge replicas and duplicates with the same function without importing each other.
"""

from __future__ import annotations

import torch
from torch import nn

from antimemo._checks import check_int

__all__ = ["PixelEmbedder"]


class PixelEmbedder(nn.Module):
    """Weights-free image embedder: adaptive average pooling, flatten, centre, L2-normalise.

    Args:
        size: output side of the pooling (``size x size`` per channel; 16 gives ``16*16*C`` dims).

    Example:
        >>> e = PixelEmbedder(size=4)(torch.rand(2, 3, 32, 32))
        >>> e.shape, torch.allclose(e.norm(dim=1), torch.ones(2))
        (torch.Size([2, 48]), True)
    """

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.size = check_int("size", size, 1, "e.g. size=16")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch.

        Args:
            images: float tensor ``[B, C, H, W]``.

        Returns:
            ``[B, C * size * size]``; rows are unit vectors, or zero for an image whose pooled
            pixels vary by less than about ``1e-5`` (a constant image).
        """
        x = nn.functional.adaptive_avg_pool2d(images.float(), self.size).flatten(1)
        mean = x.mean(dim=1, keepdim=True)
        x = x - mean
        norm = x.norm(dim=1, keepdim=True)
        # a (nearly) constant image has no direction: rounding noise would become a random unit vector
        flat = norm <= 1e-5 * x.shape[1] ** 0.5 * (1.0 + mean.abs())
        return torch.where(flat, torch.zeros_like(x), x / norm.clamp_min(1e-30))
