"""Model checks for DP-SGD (no Lightning): which layers Opacus can train privately."""

from __future__ import annotations

import warnings

from torch import nn

__all__ = ["check_no_tied_ghost", "shared_parameters", "validate_model"]


def validate_model(pl_module: nn.Module, fix: bool) -> list[str]:
    """Check that Opacus can compute per-sample gradients of every trainable layer of ``pl_module``.

    With ``fix=True`` unsupported layers (BatchNorm, LSTM, MultiheadAttention) are replaced in
    place by Opacus' DP-compatible equivalents, with a warning. Returns the replacements made
    (``"name: Old -> New"``).

    Raises:
        ValueError: naming each layer that cannot be trained privately and the fix.

    Example:
        >>> validate_model(nn.Sequential(nn.Linear(2, 2)), fix=False)
        []
    """
    fixed_layers: list[str] = []
    from opacus.grad_sample import GradSampleHooks
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    def problems() -> list[tuple[str, nn.Module, str]]:
        out = []
        for name, sub in trainable_modules(pl_module):
            if type(sub) in ModuleValidator.VALIDATORS:
                for err in ModuleValidator.VALIDATORS[type(sub)](sub):
                    out.append((name, sub, str(err)))
        for err_name, sub in trainable_modules(pl_module):
            if list(sub.buffers(recurse=False)) and not any(n == err_name for n, _, _ in out):
                out.append((err_name, sub, "a trainable layer with buffers (its state mixes samples)"))
        return out

    found = problems()
    if found and fix:
        for name, sub, _ in found:
            if type(sub) not in ModuleValidator.FIXERS:
                continue
            new = ModuleValidator.FIXERS[type(sub)](sub)
            params = list(sub.parameters())
            if params:
                new.to(params[0].device)
            parent_name, _, child = name.rpartition(".")
            parent = pl_module.get_submodule(parent_name) if parent_name else pl_module
            parent._modules[child] = new
            fixed_layers.append(f"{name}: {type(sub).__name__} -> {type(new).__name__}")
        if fixed_layers:
            warnings.warn(
                "DifferentialPrivacy(fix=True) replaced layers Opacus does not support: "
                + "; ".join(fixed_layers),
                UserWarning,
                stacklevel=3,
            )
        found = problems()
    if found:
        lines = [f"  {name or '<root>'} ({type(sub).__name__}): {reason.split('. ')[0]}" for name, sub, reason in found]
        hint = (
            "pass DifferentialPrivacy(fix=True) to replace them (BatchNorm -> GroupNorm, LSTM -> DPLSTM, "
            "MultiheadAttention -> DPMultiheadAttention)"
            if not fix
            else "fix=True has no replacement for these; change the model"
        )
        raise ValueError("DifferentialPrivacy cannot train these layers privately:\n" + "\n".join(lines) + "\n" + hint)
    errors = GradSampleHooks.validate(pl_module, strict=False)
    if errors:  # pragma: no cover - covered by the buffer check above
        raise ValueError(f"DifferentialPrivacy: Opacus rejects the model: {errors}")
    return fixed_layers


def shared_parameters(module: nn.Module, types: object = None) -> list[list[str]]:
    """The names of the layers that share a trainable parameter (e.g. tied embeddings), one
    sorted list per shared parameter; only layers whose type is in ``types``, if given.

    Example:
        >>> emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        >>> head.weight = emb.weight
        >>> shared_parameters(nn.Sequential(emb, head))
        [['0', '1']]
    """
    owners: dict[int, set[str]] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        if types is not None and type(sub) not in types:  # type: ignore[operator]
            continue
        for p in sub.parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), set()).add(name or "<root>")
    return [sorted(names) for names in owners.values() if len(names) > 1]


def check_no_tied_ghost(pl_module: nn.Module) -> None:
    """Ghost clipping cannot handle a parameter shared between layers: raise naming the layers."""
    from opacus.grad_sample import GradSampleHooksFastGradientClipping

    tied = shared_parameters(pl_module, GradSampleHooksFastGradientClipping.NORM_SAMPLERS)
    if tied:
        raise ValueError(
            f"grad_sample_mode='ghost' does not support parameters shared between layers (Opacus ghost clipping), "
            f"found {tied[0]}; untie them (e.g. tie_word_embeddings=False) or use grad_sample_mode='hooks'"
        )
