"""``ExampleTiedDropout`` (Maini et al. 2023; TinyMem) and the ``WithExampleIds`` dataset wrapper."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from antimemo.callbacks._lm_loss_hook import check_key, resolve_module
from antimemo._checks import check_seed
from antimemo.callbacks._interactions import check_composition, declare
from antimemo.functional.regularizers import (
    _check_example_ids,
    _check_p_fixed,
    _check_p_mem,
    example_tied_dropout,
)

__all__ = ["ExampleTiedDropout", "WithExampleIds"]


class WithExampleIds(Dataset):
    """Wrap a map-style dataset of dicts so that item ``i`` also holds its index: ``{**dataset[i], key: i}``.

    The default ``collate_fn`` turns the ids into a ``LongTensor[B]``, which is what
    :class:`ExampleTiedDropout` reads. Under DDP each rank's ``DistributedSampler`` yields global
    dataset indices, so an example has the same id on every rank and in every epoch.

    Args:
        dataset: a map-style dataset whose items are dicts (e.g. ``{"input_ids": ...}``).
        key: the key to add (must not already be in the items).

    Example:
        >>> ds = WithExampleIds([{"input_ids": torch.tensor([5, 6])}, {"input_ids": torch.tensor([7, 8])}])
        >>> ds[1]["example_id"], len(ds)
        (1, 2)
    """

    def __init__(self, dataset: Any, key: str = "example_id") -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"dataset must be a map-style dataset (with __getitem__ and __len__), got {type(dataset).__name__}"
            )
        self.dataset = dataset
        self.key = check_key("key", key)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(
                f"WithExampleIds needs dataset items that are dicts, got {type(item).__name__} at index {index}; "
                "return e.g. {'input_ids': ...} from the dataset"
            )
        if self.key in item:
            raise ValueError(
                f"dataset item {index} already has the key {self.key!r}; pass key=... with another name"
            )
        return {**item, self.key: int(index)}


class ExampleTiedDropout(pl.Callback):
    """Example-tied dropout: shared neurons plus neurons tied to each training example's id.

    Forward hooks (``register_forward_hook``) on every submodule of ``pl_module.<module_name>``
    whose name matches ``module_pattern`` (``re.search``; by default each decoder layer's
    ``mlp``, whose output is ``[B, T, hidden]``) rewrite that module's output ``h``
    (:func:`antimemo.functional.example_tied_dropout`; ``n`` = last dimension):

    * **training** (the module is in train mode, during a training batch): ``h * mask`` where the
      first ``floor(p_fixed * n)`` neurons (generalization neurons) are kept for every example and
      each other neuron (memorization neuron) is kept with probability ``p_mem``, chosen by a
      hash of ``(seed, example id, neuron index)``, so an example always uses the same
      memorization neurons, in every epoch and on every rank. The ids come from
      ``batch[example_ids_key]`` (wrap your dataset with :class:`WithExampleIds`).
    * **evaluation** (the module is in eval mode: validation, test, predict, generation by
      ``MemorizationMonitor``): memorization neurons are set to 0 and generalization neurons
      scaled by ``(p_fixed + p_mem) / p_fixed`` (as Maini et al. and TinyMem). This *is* the
      evaluated model of the method: validation loss is that of the network without the
      memorization neurons.

    ``p_fixed=1`` is plain training (every neuron shared, no rescaling; the hooks return the
    output unchanged). ``p_mem=0`` is *not* plain training: it trains and evaluates a fixed
    ``p_fixed`` subnetwork of each hooked layer.

    The hooks are attached at ``setup`` and removed at ``teardown`` of every Trainer stage. The
    trained weights are meant to be used *with* the evaluation transform: outside a Trainer call
    :meth:`attach` on the Hugging Face model (e.g. after ``from_pretrained``) before evaluating
    or generating. ``state_dict`` holds ``{"p_fixed", "p_mem", "seed"}``; resuming with other
    values raises, since it would change which neurons each example owns.

    Args:
        p_fixed: fraction of generalization neurons, in ``(0, 1]`` (TinyMem: 0.2; 1 disables).
        p_mem: probability that a memorization neuron is tied to an example, in ``[0, 1]``
            (TinyMem: 0.1).
        seed: seed of the neuron-assignment hash.
        example_ids_key: batch key of the ``LongTensor[B]`` example ids.
        module_pattern: regular expression (``re.search``) selecting the hooked submodules by
            their name relative to the model; e.g. ``r"layers\\.\\d+\\.mlp\\.act_fn$"`` masks the
            MLP's intermediate neurons instead of its output.
        module_name: attribute path of the model in the LightningModule.

    Example:
        >>> import lightning.pytorch as pl
        >>> cb = ExampleTiedDropout(p_fixed=0.2, p_mem=0.1)
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=10)  # doctest: +SKIP
        >>> cb.state_dict()
        {'p_fixed': 0.2, 'p_mem': 0.1, 'seed': 0}
    """

    declaration = declare("model", domain="lm", note="forward hooks on MLP outputs")

    def __init__(
        self,
        p_fixed: float = 0.2,
        p_mem: float = 0.1,
        seed: int = 0,
        example_ids_key: str = "example_id",
        module_pattern: str = r"layers\.\d+\.mlp$",
        module_name: str = "model",
    ) -> None:
        super().__init__()
        self.p_fixed = _check_p_fixed(p_fixed)
        self.p_mem = _check_p_mem(p_mem)
        self.seed = check_seed(seed)
        self.example_ids_key = check_key("example_ids_key", example_ids_key)
        if not example_ids_key:
            raise ValueError("example_ids_key must be a non-empty batch key, e.g. 'example_id'")
        self.module_pattern = check_key("module_pattern", module_pattern)
        try:
            self._regex = re.compile(module_pattern)
        except re.error as err:
            raise ValueError(
                f"module_pattern={module_pattern!r} is not a valid regular expression ({err}); e.g. r'layers\\.\\d+\\.mlp$'"
            ) from None
        self.module_name = check_key("module_name", module_name)
        self._handles: list[Any] = []
        self._hooked: list[str] = []
        self._ids: Tensor | None = None
        self._ids_len = 0
        self._masked = 0

    def __repr__(self) -> str:
        return (
            f"ExampleTiedDropout(p_fixed={self.p_fixed}, p_mem={self.p_mem}, seed={self.seed}, "
            f"example_ids_key={self.example_ids_key!r}, module_pattern={self.module_pattern!r}, "
            f"module_name={self.module_name!r})"
        )

    @property
    def hooked_modules(self) -> list[str]:
        """Names (relative to the model) of the modules whose output is masked."""
        return list(self._hooked)

    def attach(self, model: nn.Module) -> ExampleTiedDropout:
        """Register the hooks on ``model``'s submodules matching ``module_pattern``.

        Use it outside a Trainer (e.g. on a model loaded for generation) to evaluate the trained
        network as the method defines it; in eval mode no example ids are needed.

        Args:
            model: the model (e.g. a ``LlamaForCausalLM``).

        Returns:
            ``self``.

        Raises:
            ValueError: no submodule matches ``module_pattern``.

        Example:
            >>> import torch.nn as nn
            >>> net = nn.Sequential(nn.Linear(4, 10)).eval()
            >>> cb = ExampleTiedDropout(module_pattern=r"^0$").attach(net)
            >>> net(torch.ones(1, 4)).ne(0).sum().item()  # only floor(0.2 * 10) = 2 neurons survive
            2
            >>> cb.detach()
        """
        self.detach()
        names = []
        for name, module in model.named_modules():
            if name and self._regex.search(name):
                self._handles.append(module.register_forward_hook(self._hook))
                names.append(name)
        if not names:
            sample = [name for name, _ in model.named_modules() if name][:12]
            raise ValueError(
                f"ExampleTiedDropout: no submodule of {type(model).__name__} matches module_pattern="
                f"{self.module_pattern!r}; some module names: {sample}. Pass module_pattern=... (re.search on "
                "these names), e.g. r'layers\\.\\d+\\.mlp$' for Llama-style decoder layers"
            )
        self._hooked = names
        return self

    def detach(self) -> None:
        """Remove the hooks (the model computes its plain forward again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hooked = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Attach the hooks to ``pl_module.<module_name>``."""
        if stage == "fit":
            check_composition(trainer)
        self.attach(resolve_module(pl_module, self.module_name, "ExampleTiedDropout"))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks."""
        self.detach()
        self._ids = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Read the example ids of the training batch."""
        if not isinstance(batch, Mapping) or self.example_ids_key not in batch:
            keys = sorted(map(str, batch.keys())) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(
                f"ExampleTiedDropout: the training batch has no key {self.example_ids_key!r} (example_ids_key); "
                f"got {keys}. Wrap the training dataset with antimemo.callbacks.WithExampleIds(dataset) so that "
                "each item carries its index (with antimemo.lm.TextDataModule: example_ids=True, i.e. "
                "--data.example_ids true), or pass example_ids_key=... naming your id entry"
            )
        ids = batch[self.example_ids_key]
        if not isinstance(ids, Tensor):
            ids = torch.as_tensor(ids)
        self._ids = _check_example_ids(ids)
        self._ids_len = int(self._ids.shape[0])
        self._masked = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Forget the batch's ids; raise if no hooked module ran in training mode in this step."""
        self._ids = None
        if self.p_fixed < 1.0 and self._masked == 0 and self._ids_len > 0:
            raise RuntimeError(
                f"ExampleTiedDropout: none of the hooked modules ({', '.join(self.hooked_modules[:3])}...) ran in "
                f"training mode during this training step, so no mask was applied and the mitigation had no effect. "
                f"Make training_step run pl_module.{self.module_name} in training mode, or pass module_name=... / "
                "module_pattern=... naming the modules your forward uses"
            )

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.p_fixed == 1.0:
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"ExampleTiedDropout masks a module's output tensor, but {type(module).__name__} returned "
                f"{type(output).__name__}; choose modules with a tensor output via module_pattern"
            )
        if not module.training:
            return example_tied_dropout(output, None, self.p_fixed, self.p_mem, self.seed, training=False)
        if self._ids is None:
            raise RuntimeError(
                f"ExampleTiedDropout: {type(module).__name__} ran in training mode outside a training batch, so no "
                "example ids are known. Call model.eval() for evaluation/generation (memorization neurons "
                "dropped), or run training through the Trainer with ids in the batch"
            )
        if output.shape[0] != self._ids.shape[0]:
            raise ValueError(
                f"ExampleTiedDropout: the batch has {self._ids.shape[0]} example ids but {type(module).__name__}'s "
                f"output has batch size {output.shape[0]}; give one id per sequence"
            )
        self._masked += 1
        return example_tied_dropout(output, self._ids, self.p_fixed, self.p_mem, self.seed, training=True)

    def state_dict(self) -> dict[str, Any]:
        """``{"p_fixed", "p_mem", "seed"}``."""
        return {"p_fixed": self.p_fixed, "p_mem": self.p_mem, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that the checkpoint was trained with this callback's ``(p_fixed, p_mem, seed)``.

        Raises:
            ValueError: the values differ or are missing.
        """
        mine = self.state_dict()
        theirs = {k: state_dict.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(
                f"The checkpoint was trained with ExampleTiedDropout({theirs}) but this run uses {mine}; resuming "
                "with other values changes which neurons each example owns. Resume with the checkpoint's values or "
                "start a new run without ckpt_path"
            )
