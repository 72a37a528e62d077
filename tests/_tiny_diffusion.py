"""A tiny class-conditional DiffusionModule and 8x8 digits data, shared by the diffusion callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from antimemo.diffusion import DiffusionModule, ImageDataset, load_digits_images

X, Y = load_digits_images(8)


def tiny() -> DiffusionModule:
    return DiffusionModule(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_train_timesteps=20, num_inference_steps=2)


class Data(pl.LightningDataModule):
    """24 training digits and 16 validation digits, unshuffled, batches of 8."""

    def train_dataloader(self):
        return DataLoader(ImageDataset(X[:24], Y[:24]), batch_size=8, shuffle=False)

    def val_dataloader(self):
        return DataLoader(ImageDataset(X[100:116], Y[100:116]), batch_size=8, shuffle=False)
