"""Recursive training on generated data (model collapse): ``antimemo recursive``.

- :mod:`antimemo.collapse.loop`: the loop (generation 0 on real data, then replace / accumulate /
  filter), each fit an ``antimemo fit`` subprocess; ``generations.csv``, ``summary.md``,
  ``collapse.png``.
- :mod:`antimemo.collapse.synth`: watermarked sampling from a checkpoint (``WatermarkedLM`` wraps
  any causal LM for :func:`antimemo.functional.sample_generate`), token files, detection flags.
- :mod:`antimemo.collapse.images`: the same loop for a diffusion recipe (images sampled from a
  ``DiffusionModule``; FID, Vendi and replica rate from the recipe's ``replica_monitor``), and
  :mod:`antimemo.collapse.image_files` (``ImageFileDataModule``, Lightning) that its fits read.

A pipeline of your own needs none of this: ``GreenListProcessor`` / ``detect_watermark``
(:mod:`antimemo.watermark`), ``WatermarkFilter`` and ``DiversityMonitor`` (callbacks) and
``TokenFileDataModule`` are usable directly. Importing the loop does not import Lightning: the
recipe's classes are imported by class path when it runs, and only ``image_files`` imports it.
"""

from antimemo.collapse.loop import MIXES, CollapsePlan, run_recursive

__all__ = ["MIXES", "CollapsePlan", "run_recursive"]
