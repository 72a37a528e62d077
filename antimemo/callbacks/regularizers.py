"""The LM regularizers against memorization, as Lightning callbacks (one module each).

* :class:`~antimemo.callbacks.loss_floor.LossFloor` -- per-sequence loss floor (flooding).
* :class:`~antimemo.callbacks.loss_truncation.LossTruncation` -- drop the top-``c`` losses.
* :class:`~antimemo.callbacks.spectral_norm.SpectralNormPenalty` -- ``lam/2 * sum sigma_max(W)``.
* :class:`~antimemo.callbacks.example_tied_dropout.ExampleTiedDropout` (with
  :class:`~antimemo.callbacks.example_tied_dropout.WithExampleIds`) -- example-tied dropout.

Their loss math lives in :mod:`antimemo.functional.regularizers`; ``docs/regularizers.md`` has
the definitions, defaults, references and caveats.
"""

from antimemo.callbacks.example_tied_dropout import ExampleTiedDropout, WithExampleIds
from antimemo.callbacks.loss_floor import LossFloor
from antimemo.callbacks.loss_truncation import LossTruncation
from antimemo.callbacks.spectral_norm import SpectralNormPenalty, spectral_norm_weights

__all__ = [
    "ExampleTiedDropout",
    "LossFloor",
    "LossTruncation",
    "SpectralNormPenalty",
    "WithExampleIds",
    "spectral_norm_weights",
]
