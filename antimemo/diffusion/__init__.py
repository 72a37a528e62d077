"""The diffusion recipe: a diffusers DDPM LightningModule, the digits data and a feature extractor.

- :class:`DiffusionModule`: ``UNet2DModel`` + ``DDPMScheduler``, class-conditional or not, with
  ``sample(num, generator, labels)`` and a loss-term hook for regularizers.
- :class:`DigitsDataModule`: scikit-learn's digits, upsampled, with duplicated images.
- :class:`DigitsFeatures`: a digits CNN trained on construction, used for fidelity features.

Needs ``diffusers`` and ``scikit-learn`` (``pip install antimemo[diffusion]``).
"""

from antimemo.diffusion.data import DigitsDataModule, ImageDataset, load_digits_images
from antimemo.diffusion.features import DigitsFeatures
from antimemo.diffusion.module import DiffusionModule, DiffusionStep, LossTermHandle

__all__ = [
    "DiffusionModule",
    "DiffusionStep",
    "DigitsDataModule",
    "DigitsFeatures",
    "ImageDataset",
    "LossTermHandle",
    "load_digits_images",
]
