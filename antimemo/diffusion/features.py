"""``DigitsFeatures``: a small digits classifier trained on the spot, used as a feature extractor.

Fidelity (Fréchet distance) and semantic similarity need a feature space. Instead of
downloading Inception weights, the recipe trains this CNN on scikit-learn's digits when it is
constructed (a few seconds on a CPU, seeded, deterministic) and uses its penultimate layer
(``num_features`` dims) as the features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DigitsFeatures"]


class DigitsFeatures(nn.Module):
    """A CNN digit classifier whose ``forward`` returns penultimate features ``[B, num_features]``.

    Constructing it trains it (AdamW, full-batch-free minibatches of 128, ``epochs`` passes)
    on all 1797 scikit-learn digits at ``image_size`` with light random shifts; the global RNG
    is not touched (a private generator). ``accuracy`` holds the training accuracy reached;
    ``logits(x)`` gives class scores.

    Args:
        image_size: side of the images it will see (``[B, 1, S, S]`` in ``[0, 1]``).
        num_features: width of the feature layer.
        epochs: training passes (0: an untrained, randomly initialised extractor).
        seed: seed of the initialisation and of the training order.

    Example:
        >>> f = DigitsFeatures(image_size=8, epochs=2)
        >>> f(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3, 32])
    """

    def __init__(self, image_size: int = 16, num_features: int = 32, epochs: int = 15, seed: int = 0) -> None:
        super().__init__()
        from antimemo.diffusion.data import load_digits_images

        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be an integer >= 1, got {num_features!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
        self.image_size, self.num_features = int(image_size), int(num_features)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # digits are natively 8x8: pooling to 8x8 first keeps the extractor cheap at any size
            self.body = nn.Sequential(
                nn.AdaptiveAvgPool2d(8),
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                nn.Linear(32 * 16, num_features), nn.ReLU(),
            )
            self.head = nn.Linear(num_features, 10)
        self.accuracy = float("nan")
        if epochs:
            x, y = load_digits_images(image_size)
            self._fit(x, y, epochs, seed)
        self.eval()

    def _fit(self, x: Tensor, y: Tensor, epochs: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        self.train()
        pad = max(1, self.image_size // 8)
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0], generator=g)
            for s in range(0, x.shape[0], 128):
                idx = perm[s : s + 128]
                dx, dy = torch.randint(-pad, pad + 1, (2,), generator=g).tolist()
                xb = torch.roll(x[idx], shifts=(dx, dy), dims=(2, 3))
                loss = nn.functional.cross_entropy(self.logits(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.eval()
        with torch.no_grad():
            self.accuracy = float((self.logits(x).argmax(1) == y).float().mean())

    def logits(self, x: Tensor) -> Tensor:
        """Class scores ``[B, 10]``."""
        return self.head(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Penultimate features ``[B, num_features]``."""
        return self.body(x)
