"""``OffsetTextDataModule``: disjoint training splits of one corpus (pretraining, then fine-tuning).

:class:`~antimemo.lm.data.TextDataModule` shuffles the corpus rows once (``seed``), holds out the
first ``num_holdout`` and trains on the next ``num_train``. This subclass skips ``train_offset``
rows of that training order first, so two runs with the same ``seed`` and ``num_holdout`` share
the held-out set and train on disjoint rows: ``train_offset=0, num_train=2048`` for pretraining,
``train_offset=2048, num_train=256`` for fine-tuning (``recipes/lm_dp_lora.yaml``).
"""

from __future__ import annotations

from typing import Any

import torch

from antimemo._checks import check_int
from antimemo.lm.data import TextDataModule

__all__ = ["OffsetTextDataModule"]


class OffsetTextDataModule(TextDataModule):
    """:class:`~antimemo.lm.data.TextDataModule` whose training rows start ``train_offset`` rows later.

    Args:
        train_offset: training rows (of the seeded order after the held-out rows) to skip; 0 is
            ``TextDataModule``.
        **kwargs: the :class:`~antimemo.lm.data.TextDataModule` arguments.

    Example:
        >>> pre = OffsetTextDataModule(num_train=8, num_holdout=4, train_offset=0).build_split()
        >>> ft = OffsetTextDataModule(num_train=4, num_holdout=4, train_offset=8).build_split()
        >>> torch.equal(pre[1], ft[1]), bool((pre[0][:, None] == ft[0][None]).all(-1).any())
        (True, False)
    """

    def __init__(self, train_offset: int = 0, **kwargs: Any) -> None:
        check_int("train_offset", train_offset, 0, "0 trains on the first rows after the held-out ones")
        super().__init__(**kwargs)
        self.train_offset = int(train_offset)

    def build_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(train_ids, holdout_ids)``: the held-out rows of ``TextDataModule`` and the training rows after the offset."""
        if not self.train_offset:
            return super().build_split()
        num_train = self.num_train
        self.num_train = None if num_train is None else self.train_offset + num_train
        try:
            train, holdout = super().build_split()
        except ValueError as err:
            raise ValueError(f"train_offset={self.train_offset} (added to num_train={num_train}): {err}") from None
        finally:
            self.num_train = num_train
        train = train[self.train_offset :]
        if train.shape[0] == 0:
            raise ValueError(
                f"train_offset={self.train_offset} skips every training row of corpus {self.corpus!r}; lower it"
            )
        return train, holdout
