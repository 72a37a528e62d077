"""Book-keeping per-sample clipping: exact DP-SGD clipping from one backward pass (no Lightning).

DP-SGD needs, per step, the sum over the batch of per-sample gradients each clipped to norm
``C``: ``sum_b min(1, C / ||g_b||) g_b``. Opacus' routes pay for it with memory or time: ``hooks``
builds every per-sample gradient (``B x parameters`` floats, written and read three times), and
ghost clipping computes the norms cheaply but then runs a **second backward pass** on the
reweighted loss. Book-keeping (BK; Bu, Wang, Zha and Karypis, "Differentially Private
Optimization on Large Model at Small Cost", ICML 2023) runs one backward pass and keeps what
ghost clipping already needs, each layer's input ``A`` and output gradient ``G``:

- **norms** (ghost norms): for ``nn.Linear`` applied to ``[B, T, d_in]``, the per-sample weight
  gradient is ``G_b^T A_b`` and ``||G_b^T A_b||_F^2 = <A_b A_b^T, G_b G_b^T>`` (``T^2 (d_in +
  d_out)`` per sample), or ``G_b^T A_b`` built one layer at a time where that is cheaper (long
  sequences); for ``nn.Embedding`` the per-sample gradient's rows are sums of ``G`` over equal
  tokens, whose norms come from one ``index_add`` (no ``T^2`` term);
- **the clipped sum**: ``sum_b c_b G_b^T A_b = (c * G)^T A`` is one matrix product per layer,
  the same product autograd's weight gradient is, so it replaces the weight gradient rather
  than adding to it: the patched layers return no weight gradient to autograd at all.

So a BK step costs a plain step plus the norms and the noise; no per-sample gradient is stored
and there is no second backward. Layers of other types with trainable parameters (e.g.
``LlamaRMSNorm``, whose weight is one vector) get per-sample gradients from the Opacus grad
sampler registered for their type, as in ``hooks``.

The clipping rule and the constant are Opacus' (``min(1, C / (||g_b|| + 1e-6))``), the norm is
over every trainable parameter (flat clipping), and the caller adds the noise with Opacus'
optimizer (:class:`BookKeepingDPOptimizer`), so accounting is unchanged.

**What BK cannot see, and refuses.** A parameter shared by two layers (tied embeddings), a
layer type with neither a BK rule nor an Opacus grad sampler, an input that is not batch-first,
and a patched layer's weight used outside that layer's ``forward`` (e.g. ``F.linear(x,
layer.weight)``) all raise: the last shows up as an autograd gradient on a weight BK handles,
which is checked every step.

``fastDP`` (awslabs/fast-differential-privacy) implements BK but is not published on PyPI and
asks for ``torch<=1.11``; Opacus has no BK route. Hence this module, tested against Opacus'
``hooks`` clipping (tests/test_dp_bookkeeping.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from antimemo.dp.validate import shared_parameters

__all__ = [
    "BookKeeping",
    "BookKeepingDPOptimizer",
    "bookkeeping_blocker",
    "bookkeeping_optimizer_class",
    "bookkeeping_share",
    "ghost_cheaper",
]


class _Record:
    """What one layer's forward/backward passes left for the step: inputs and output gradients."""

    __slots__ = ("name", "module", "kind", "inputs", "grads", "tasks")

    def __init__(self, name: str, module: nn.Module, kind: str) -> None:
        self.name, self.module, self.kind = name, module, kind
        self.inputs: list[Any] = []
        self.grads: list[Tensor] = []
        self.tasks: list[int] = []  # the autograd graph task (one per .backward() call) of each capture

    def add(self, inputs: Any, grad: Tensor) -> None:
        # detached: the activations require grad, and the norms and sums computed from them later
        # must not record an autograd graph (which would keep every activation alive through them)
        self.inputs.append(inputs.detach() if isinstance(inputs, Tensor) else inputs)
        self.grads.append(grad.detach())
        self.tasks.append(int(torch._C._current_graph_task_id()))

    def clear(self) -> None:
        self.inputs, self.grads, self.tasks = [], [], []


class _LinearFn(torch.autograd.Function):
    """``F.linear`` whose backward records ``(A, G)`` and gives autograd no weight/bias gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, rec: _Record) -> Tensor:  # type: ignore[override]
        ctx.rec = rec
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        ctx.rec.add(x, g)
        grad_x = g.matmul(weight.to(g.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class _EmbeddingFn(torch.autograd.Function):
    """``F.embedding`` whose backward records ``(ids, G)`` and gives autograd no weight gradient."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, padding_idx: int | None, rec: _Record) -> Tensor:  # type: ignore[override]
        ctx.rec = rec
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, None, None, None]:  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        ctx.rec.add(ids, g)
        return None, None, None, None


def ghost_cheaper(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether a linear layer's ghost norm (``T^2 (d_in + d_out)`` per sample) costs no more than
    building its per-sample gradient (``T d_in d_out``).

    Example:
        >>> ghost_cheaper(64, 384, 1536), ghost_cheaper(4096, 384, 1536)
        (True, False)
    """
    return tokens * (d_in + d_out) <= d_in * d_out


def _direct_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _embedding_problem(m: nn.Embedding) -> str | None:
    if m.max_norm is not None:
        return "max_norm renormalises the weight in place during forward"
    if m.scale_grad_by_freq:
        return "scale_grad_by_freq scales the gradient by batch-wide token counts"
    if m.sparse:
        return "sparse=True gives sparse gradients"
    return None


def _plan(module: nn.Module) -> tuple[list[tuple[str, nn.Module, str]], list[str]]:
    """Each layer with trainable parameters and its kind (``linear``/``embedding``/``sampler``),
    and the reasons BK cannot train the module (empty if it can)."""
    from opacus.grad_sample import GradSampleModule

    from antimemo.dp.hf import register_grad_samplers

    register_grad_samplers()
    layers: list[tuple[str, nn.Module, str]] = []
    problems: list[str] = []
    for name, sub in module.named_modules():  # each module once
        if not _direct_params(sub):
            continue
        label = name or "<root>"
        if "forward" in sub.__dict__:
            problems.append(f"{label} ({type(sub).__name__}): its forward is already replaced on the instance")
        elif type(sub) is nn.Linear:
            layers.append((label, sub, "linear"))
        elif type(sub) is nn.Embedding:
            why = _embedding_problem(sub)
            if why is not None:
                problems.append(f"{label} (nn.Embedding): {why}")
            else:
                layers.append((label, sub, "embedding"))
        elif type(sub) in GradSampleModule.GRAD_SAMPLERS:
            layers.append((label, sub, "sampler"))
        else:
            problems.append(f"{label} ({type(sub).__name__}): no book-keeping rule and no Opacus grad sampler")
    tied = shared_parameters(module)
    if tied:
        problems.append(f"a parameter is shared by the layers {tied[0]} (e.g. tied embeddings)")
    return layers, problems


def bookkeeping_blocker(module: nn.Module) -> str | None:
    """Why book-keeping cannot clip ``module``'s per-sample gradients (``None`` if it can).

    Example:
        >>> bookkeeping_blocker(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))) is None
        True
        >>> print(bookkeeping_blocker(nn.Sequential(nn.Linear(4, 4), nn.PReLU())))
        1 (PReLU): no book-keeping rule and no Opacus grad sampler
    """
    layers, problems = _plan(module)
    if problems:
        return "; ".join(problems)
    if not layers:
        return "the module has no trainable parameters"
    return None


def bookkeeping_share(module: nn.Module) -> float:
    """The share of ``module``'s trainable parameters in layers book-keeping clips without
    per-sample gradients (``nn.Linear``, ``nn.Embedding``); the rest go through Opacus' samplers.

    Example:
        >>> round(bookkeeping_share(nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4))), 3)  # 16 of 24
        0.667
    """
    layers, _ = _plan(module)
    total = fast = 0
    for _, sub, kind in layers:
        n = sum(p.numel() for p in _direct_params(sub))
        total += n
        fast += n if kind in ("linear", "embedding") else 0
    return fast / total if total else 0.0


class BookKeeping:
    """Per-sample norms and the clipped gradient sum of ``module`` from one backward pass.

    ``attach`` replaces the ``forward`` of every ``nn.Linear`` and ``nn.Embedding`` with
    trainable parameters by one that records the layer's input and output gradient (and gives
    autograd no gradient for those parameters), and hooks every other layer with trainable
    parameters to record the same for its Opacus grad sampler. After each backward pass of a
    batch-mean loss over ``B`` rows, :meth:`clipped_sums` returns, for every trainable parameter,
    ``sum_b min(1, C / (||g_b|| + 1e-6)) g_b``, where ``g_b`` is row ``b``'s gradient (``B`` times
    its share of the mean loss's gradient, as Opacus' ``loss_reduction="mean"``) and ``||g_b||``
    is its norm over all trainable parameters.

    Args:
        module: the model; its trainable parameters at :meth:`attach` are the ones clipped.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
        >>> bk = BookKeeping(net).attach()
        >>> ids = torch.randint(0, 10, (3, 5))
        >>> net(ids).logsumexp(-1).mean(1).mean().backward()
        >>> sums = bk.clipped_sums(max_grad_norm=1e-3)
        >>> bool(net[1].weight.grad is None), tuple(sums[net[1].weight].shape)
        (True, (10, 4))
        >>> bk.last_norms.shape, bool((bk.last_norms > 1e-3).all())
        (torch.Size([3]), True)
        >>> bk.detach()
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.records: list[_Record] = []
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []
        #: the per-sample gradient norms of the last :meth:`clipped_sums` (shape ``[B]``)
        self.last_norms: Tensor | None = None

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> BookKeeping:
        """Patch and hook the layers; raise ``ValueError`` naming every layer BK cannot handle."""
        if self.records:
            raise RuntimeError("BookKeeping.attach: already attached")
        layers, problems = _plan(self.module)
        if problems:
            raise ValueError(
                "grad_sample_mode='bookkeeping' cannot clip this model's per-sample gradients: " + "; ".join(problems)
                + ". Use grad_sample_mode='hooks'"
            )
        for name, sub, kind in layers:
            rec = _Record(name, sub, kind)
            self.records.append(rec)
            if kind == "linear":
                sub.forward = self._linear_forward(sub, rec)  # type: ignore[method-assign]
                self._patched.append(sub)
            elif kind == "embedding":
                sub.forward = self._embedding_forward(sub, rec)  # type: ignore[method-assign]
                self._patched.append(sub)
            else:
                self._handles.append(sub.register_forward_hook(self._sampler_hook(rec)))
        return self

    def detach(self) -> None:
        """Restore the layers' own ``forward`` and remove the hooks."""
        for sub in self._patched:
            sub.__dict__.pop("forward", None)
        for handle in self._handles:
            handle.remove()
        self._patched, self._handles, self.records = [], [], []

    @staticmethod
    def _linear_forward(m: nn.Linear, rec: _Record) -> Any:
        def forward(x: Tensor) -> Tensor:
            if not torch.is_grad_enabled():
                return F.linear(x, m.weight, m.bias)
            return _LinearFn.apply(x, m.weight, m.bias, rec)

        return forward

    @staticmethod
    def _embedding_forward(m: nn.Embedding, rec: _Record) -> Any:
        def forward(ids: Tensor) -> Tensor:
            if not torch.is_grad_enabled():
                return F.embedding(ids, m.weight, m.padding_idx)
            return _EmbeddingFn.apply(ids, m.weight, m.padding_idx, rec)

        return forward

    @staticmethod
    def _sampler_hook(rec: _Record) -> Any:
        def hook(m: nn.Module, args: tuple, out: Any) -> None:
            if not torch.is_grad_enabled() or not isinstance(out, Tensor) or not out.requires_grad:
                return
            saved = [a.detach() if isinstance(a, Tensor) else a for a in args]
            out.register_hook(lambda g: rec.add(saved, g))

        return hook

    # ------------------------------------------------------------------ per step
    def clear(self) -> None:
        """Drop what the backward passes since the last step recorded (:meth:`clipped_sums` does, at its end)."""
        for rec in self.records:
            rec.clear()

    def params(self) -> list[nn.Parameter]:
        """The trainable parameters BK clips, layer by layer."""
        return [p for rec in self.records for p in _direct_params(rec.module)]

    def _batch(self) -> int:
        """The batch size all captures agree on; raise unless they come from exactly one backward pass."""
        tasks = {t for rec in self.records for t in rec.tasks}
        if not tasks:
            raise RuntimeError(
                "grad_sample_mode='bookkeeping': no layer received a gradient since the last step (backward was not "
                "called on this batch's loss, or it ran with the layers' forward outside autograd)"
            )
        if len(tasks) != 1:
            raise RuntimeError(
                f"grad_sample_mode='bookkeeping': the gradients of this step come from {len(tasks)} backward passes; "
                "book-keeping clips the per-sample gradients of one backward pass per step (no gradient "
                "accumulation over several batches: make each Poisson batch one step)"
            )
        sizes = {(rec.name, int(g.shape[0])) for rec in self.records for g in rec.grads}
        batch = {size for _, size in sizes}
        if len(batch) != 1:
            raise RuntimeError(
                f"grad_sample_mode='bookkeeping': the layers saw different batch sizes {sorted(batch)} (e.g. "
                f"{sorted(sizes)[:3]}); every layer's input must be batch-first with the batch's rows"
            )
        return batch.pop()

    def _check_no_autograd_grads(self) -> None:
        for rec in self.records:
            if rec.kind == "sampler":
                continue
            for p in _direct_params(rec.module):
                if p.grad is not None:
                    raise RuntimeError(
                        f"grad_sample_mode='bookkeeping': the parameter of shape {tuple(p.shape)} of layer {rec.name} "
                        f"({type(rec.module).__name__}) received a gradient from autograd: it is used outside the "
                        "layer's forward (e.g. F.linear(x, layer.weight) or a tied weight), which book-keeping cannot "
                        "clip, or the gradients were not zeroed before backward. Use grad_sample_mode='hooks'"
                    )

    @torch.no_grad()
    def clipped_sums(self, max_grad_norm: float) -> dict[nn.Parameter, Tensor]:
        """Per-sample norms over all trainable parameters, and each parameter's clipped sum."""
        self._check_no_autograd_grads()
        b = self._batch()
        terms: list[tuple[_Record, dict[str, Any]]] = []
        norms_sq: Tensor | None = None
        # layers fed the same input (q/k/v, gate/up) share A A^T and the scaled A: keyed by the input tensors
        cache: dict[Any, Tensor] = {}
        for rec in self.records:
            if not rec.grads:  # the layer took no part in this batch's loss: its gradient is exactly zero
                continue
            state, sq = self._norms(rec, b, cache)
            terms.append((rec, state))
            norms_sq = sq if norms_sq is None else norms_sq + sq.to(norms_sq.device)
        assert norms_sq is not None
        norms = norms_sq.clamp(min=0).sqrt()
        self.last_norms = norms
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        out: dict[nn.Parameter, Tensor] = {}
        for rec, state in terms:
            out.update(self._sums(rec, state, factor * b, cache))
        for p in self.params():
            if p not in out:
                out[p] = torch.zeros_like(p)
        cache.clear()
        self.clear()  # free the book-kept activations as soon as the sums exist
        return out

    # ------------------------------------------------------------------ per layer kind
    @staticmethod
    def _flat(xs: list[Tensor], b: int) -> Tensor:
        """``[B, T_total, d]``: the calls of one layer joined along the token axis (exact for reuse)."""
        parts = [x.reshape(b, -1, x.shape[-1]) for x in xs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _norms(self, rec: _Record, b: int, cache: dict[Any, Tensor]) -> tuple[dict[str, Any], Tensor]:
        if b == 0:
            dev = rec.grads[0].device
            return {"empty": True}, torch.zeros(0, device=dev)
        if rec.kind == "linear":
            m = rec.module
            g = self._flat(rec.grads, b)
            key = (*(id(x) for x in rec.inputs), g.dtype)
            a = self._flat(rec.inputs, b).to(g.dtype)
            sq = g.new_zeros(b, dtype=torch.float32)
            if m.weight.requires_grad:
                if ghost_cheaper(a.shape[1], a.shape[2], g.shape[2]):  # ghost norm: <A A^T, G G^T>
                    aa = cache.get(("aa", key))
                    if aa is None:
                        aa = cache[("aa", key)] = torch.bmm(a, a.transpose(1, 2))
                    sq = sq + (aa * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)).float()
                else:  # the per-sample gradients of this layer alone
                    sq = sq + torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2)).float()
            if m.bias is not None and m.bias.requires_grad:
                sq = sq + g.sum(1).pow(2).sum(1).float()
            return {"a": a, "g": g, "key": key}, sq * (b * b)
        if rec.kind == "embedding":
            m = rec.module
            ids = self._flat([i.unsqueeze(-1) for i in rec.inputs], b).squeeze(-1)
            g = self._flat(rec.grads, b)
            if m.padding_idx is not None:
                g = g * (ids != m.padding_idx).unsqueeze(-1).to(g.dtype)
            # rows of the per-sample gradient: sums of G over equal (sample, token) pairs
            key = torch.arange(b, device=ids.device).unsqueeze(1) * m.num_embeddings + ids
            uniq, inverse = torch.unique(key.reshape(-1), return_inverse=True)
            rows = g.new_zeros(uniq.numel(), g.shape[-1]).index_add_(0, inverse, g.reshape(-1, g.shape[-1]))
            sq = torch.zeros(b, device=g.device, dtype=torch.float32).index_add_(
                0, uniq // m.num_embeddings, rows.pow(2).sum(1).float()
            )
            return {"ids": ids, "g": g}, sq * (b * b)
        # sampler: Opacus' per-sample gradients, summed over the layer's calls
        from opacus.grad_sample import GradSampleModule

        sampler = GradSampleModule.GRAD_SAMPLERS[type(rec.module)]
        samples: dict[nn.Parameter, Tensor] = {}
        for args, g in zip(rec.inputs, rec.grads):
            if g.shape[0] != b:
                raise RuntimeError(f"grad_sample_mode='bookkeeping': layer {rec.name} is not batch-first")
            for p, gs in sampler(rec.module, list(args), g * b).items():
                if p.requires_grad:
                    samples[p] = gs if p not in samples else samples[p] + gs
        sq = sum(gs.reshape(b, -1).pow(2).sum(1).float() for gs in samples.values())
        return {"samples": samples}, sq  # type: ignore[return-value]

    def _sums(
        self, rec: _Record, state: dict[str, Any], factor: Tensor, cache: dict[Any, Tensor]
    ) -> dict[nn.Parameter, Tensor]:
        m = rec.module
        if state.get("empty"):
            return {p: torch.zeros_like(p) for p in _direct_params(m)}
        if rec.kind == "linear":
            a, g = state["a"], state["g"]
            f = factor.to(g.dtype).view(-1, 1, 1)
            out: dict[nn.Parameter, Tensor] = {}
            if m.weight.requires_grad:
                if a.shape[-1] <= g.shape[-1]:  # scale the narrower side by the clipping factors
                    fa = cache.get(("fa", state["key"]))
                    if fa is None:
                        fa = cache[("fa", state["key"])] = a * f
                    grad = g.reshape(-1, g.shape[-1]).t() @ fa.reshape(-1, a.shape[-1])
                else:
                    grad = (g * f).reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
                out[m.weight] = grad.to(m.weight.dtype)
            if m.bias is not None and m.bias.requires_grad:
                out[m.bias] = (g.sum(1) * f.view(-1, 1)).sum(0).to(m.bias.dtype)
            return out
        if rec.kind == "embedding":
            ids, g = state["ids"], state["g"]
            gc = (g * factor.to(g.dtype).view(-1, 1, 1)).reshape(-1, g.shape[-1])
            grad = torch.zeros(m.weight.shape, dtype=gc.dtype, device=gc.device).index_add_(0, ids.reshape(-1), gc)
            return {m.weight: grad.to(m.weight.dtype)}
        f = factor / factor.shape[0]  # the samples are per-sample gradients already (scaled by the batch size)
        return {p: torch.einsum("b,b...->...", f.to(gs.dtype), gs).to(p.dtype) for p, gs in state["samples"].items()}


class BookKeepingDPOptimizer:
    """Mixin for Opacus' fast-gradient-clipping optimizers: the clipped sum comes from :class:`BookKeeping`.

    Opacus' ``DPOptimizerFastGradientClipping`` expects ``p.grad`` to hold the clipped sum after
    its second backward pass; here ``accumulate`` takes it from the book-keeping instead, then
    Opacus adds the noise, scales and steps exactly as for ghost clipping.
    """

    bookkeeping: BookKeeping

    def accumulate(self) -> None:  # noqa: D102
        sums = self.bookkeeping.clipped_sums(self.max_grad_norm)  # type: ignore[attr-defined]
        for p in self.params:  # type: ignore[attr-defined]
            if p not in sums:
                raise RuntimeError(
                    f"grad_sample_mode='bookkeeping': the optimizer's parameter of shape {tuple(p.shape)} is not in a "
                    "layer the book-keeping tracks (it was frozen, or created, after fit start)"
                )
            if p.summed_grad is not None:
                raise RuntimeError("grad_sample_mode='bookkeeping' does not accumulate several batches into one step")
            p.summed_grad = sums[p]

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: D102
        super().zero_grad(True)  # type: ignore[misc]  # None, not zeros: a gradient from autograd is then visible


class _InPlaceNoise:
    """Opacus' ``add_noise`` (same noise, same generator calls), adding it into the clipped sum in
    place instead of into a new tensor: one ``parameters``-sized allocation and write less per step.
    Single process only: the distributed optimizer adds noise on rank 0 alone, through its own
    ``add_noise``."""

    def add_noise(self) -> None:  # noqa: D102
        from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)  # type: ignore[attr-defined]
        for p in self.params:  # type: ignore[attr-defined]
            _check_processed_flag(p.summed_grad)
            noise = _generate_noise(
                std=multiplier * self.max_grad_norm,  # type: ignore[attr-defined]
                reference=p.summed_grad,
                generator=self.generator,  # type: ignore[attr-defined]
                secure_mode=self.secure_mode,  # type: ignore[attr-defined]
            )
            p.grad = p.summed_grad.add_(noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def bookkeeping_optimizer_class(distributed: bool) -> type:
    """Opacus' (distributed) fast-gradient-clipping optimizer with :class:`BookKeepingDPOptimizer`."""
    from opacus.optimizers import get_optimizer_class

    base = get_optimizer_class(clipping="flat", distributed=distributed, grad_sample_mode="ghost")
    mixins = (BookKeepingDPOptimizer,) if distributed else (BookKeepingDPOptimizer, _InPlaceNoise)
    return type(f"BookKeeping{base.__name__}", (*mixins, base), {})
