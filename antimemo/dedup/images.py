"""Image near-duplicates: embeddings, cosine similarity, exact nearest neighbours through FAISS.

Two images are near duplicates when the cosine similarity of their embeddings is greater than a
threshold. Embeddings come from any ``nn.Module`` (``[B, C, H, W] -> [B, D]``); the weights-free
default :class:`PixelEmbedder` pools each image to ``16 x 16`` per channel, subtracts the image's
mean and L2-normalises, so it ignores brightness offsets and small resizes/blurs but not crops or
flips. Neighbours are found with ``faiss.IndexFlatIP`` (exact inner product) and
``range_search``, in query batches, so the pairs are the same as a brute-force comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from antimemo._faiss import import_faiss  # re-exported: antimemo.dedup.images.import_faiss
from antimemo._pixels import PixelEmbedder  # re-exported: antimemo.dedup.images.PixelEmbedder
from antimemo.dedup.normalize import content_hash

__all__ = ["PixelEmbedder", "embed_images", "image_content_hash", "import_faiss", "similar_pairs"]


def _check_image(x: Any, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{where} must be a floating-point tensor (e.g. pixels in [0, 1]), got dtype {x.dtype}; "
            "convert with images.float() / 255"
        )
    return x


def image_content_hash(image: torch.Tensor) -> int:
    """Content hash of one image: its shape and ``float32`` pixel bytes.

    Args:
        image: ``[C, H, W]`` float tensor.

    Returns:
        A 64-bit integer.

    Example:
        >>> image_content_hash(torch.zeros(1, 2, 2)) == image_content_hash(torch.zeros(1, 2, 2))
        True
    """
    arr = image.detach().to("cpu", torch.float32).contiguous().numpy()
    head = np.asarray(arr.shape, dtype="<i8").tobytes()
    return content_hash(head + arr.astype("<f4", copy=False).tobytes())


def _batches(images: torch.Tensor | Sequence[torch.Tensor], batch_size: int):
    if isinstance(images, torch.Tensor):
        _check_image(images, "images")
        if images.dim() != 4:
            raise ValueError(
                f"images must have shape [N, C, H, W], got {tuple(images.shape)}; add a batch "
                "dimension with images.unsqueeze(0) or a channel one with images.unsqueeze(1)"
            )
        for s in range(0, images.shape[0], batch_size):
            yield s, images[s : s + batch_size]
        return
    n = len(images)
    for s in range(0, n, batch_size):
        items = []
        for i in range(s, min(n, s + batch_size)):
            x = _check_image(images[i], f"images[{i}]")
            if x.dim() != 3:
                raise ValueError(f"images[{i}] must have shape [C, H, W], got {tuple(x.shape)}")
            items.append(x)
        shapes = {tuple(x.shape) for x in items}
        if len(shapes) == 1:
            yield s, torch.stack(items)
        else:  # different sizes: embed one by one (the embedder must accept any size)
            for k, x in enumerate(items):
                yield s + k, x.unsqueeze(0)


def embed_images(
    images: torch.Tensor | Sequence[torch.Tensor],
    embedder: nn.Module | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed images in batches and hash their content.

    Args:
        images: float tensor ``[N, C, H, W]`` or a sequence of ``[C, H, W]`` float tensors.
        embedder: ``nn.Module`` mapping ``[B, C, H, W]`` to ``[B, ...]`` (flattened to
            ``[B, D]``); ``None`` uses :class:`PixelEmbedder` ``(size=16)``. It runs in eval mode
            under ``torch.no_grad()`` and its mode is restored afterwards.
        batch_size: images per forward pass.
        device: device of the forward pass.
        progress: show a tqdm progress bar.

    Returns:
        ``(embeddings, content_hashes)``: ``float32 [N, D]`` L2-normalised rows (zero rows stay
        zero) and ``uint64 [N]``.

    Example:
        >>> emb, h = embed_images(torch.rand(3, 1, 8, 8))
        >>> emb.shape, h.shape
        ((3, 256), (3,))
    """
    from tqdm.auto import tqdm

    model = PixelEmbedder(16) if embedder is None else embedder
    if not isinstance(model, nn.Module):
        raise TypeError(f"embedder must be a torch.nn.Module or None, got {type(model).__name__}")
    n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    if n == 0:
        raise ValueError("images is empty: a duplicate index needs at least one image")
    was_training = model.training
    model.eval()
    embs: list[np.ndarray] = []
    hashes = np.empty(n, dtype=np.uint64)
    dim = None
    bar = tqdm(total=n, desc="dedup: embedding images", unit="img", disable=not progress)
    try:
        with torch.no_grad():
            for start, batch in _batches(images, batch_size):
                for k in range(batch.shape[0]):
                    hashes[start + k] = image_content_hash(batch[k])
                out = model(batch.to(device))
                if not isinstance(out, torch.Tensor) or out.shape[0] != batch.shape[0]:
                    raise ValueError(
                        f"embedder must return a tensor [B, D] with B = {batch.shape[0]} for a batch of "
                        f"{batch.shape[0]} images, got {type(out).__name__} "
                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
                    )
                out = out.detach().float().flatten(1).cpu()
                if not torch.isfinite(out).all():
                    raise ValueError(f"embedder returned non-finite values for images {start}..{start + batch.shape[0] - 1}")
                if dim is None:
                    dim = out.shape[1]
                elif out.shape[1] != dim:
                    raise ValueError(f"embedder returned {out.shape[1]} dims for images from {start} but {dim} before")
                embs.append(nn.functional.normalize(out, dim=1).numpy())
                bar.update(batch.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    return np.ascontiguousarray(np.concatenate(embs), dtype=np.float32), hashes


def similar_pairs(
    embeddings: np.ndarray, threshold: float, query_batch: int = 4096, num_threads: int | None = None
) -> np.ndarray:
    """All pairs ``i < j`` with inner product (cosine for unit rows) greater than ``threshold``.

    Uses ``faiss.IndexFlatIP`` (exact) and ``range_search`` over query batches.

    Args:
        embeddings: ``float32 [N, D]``.
        threshold: similarity threshold in ``(-1, 1)``.
        query_batch: queries per ``range_search`` call (bounds the result memory).
        num_threads: FAISS OpenMP threads for the call (restored afterwards); ``None`` keeps
            FAISS's setting.

    Returns:
        ``int64 [E, 2]`` pairs, sorted.

    Example:
        >>> e = np.array([[1, 0], [0.99, 0.141], [0, 1]], dtype=np.float32)
        >>> similar_pairs(e, 0.95).tolist()
        [[0, 1]]
    """
    faiss = import_faiss()
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    old_threads = faiss.omp_get_max_threads()
    if num_threads is not None:
        faiss.omp_set_num_threads(num_threads)
    out = []
    try:
        for s in range(0, x.shape[0], query_batch):
            lims, _, ids = index.range_search(x[s : s + query_batch], float(threshold))
            q = np.repeat(np.arange(s, s + lims.shape[0] - 1, dtype=np.int64), np.diff(lims).astype(np.int64))
            ids = ids.astype(np.int64)
            keep = ids > q
            out.append(np.stack([q[keep], ids[keep]], axis=1))
    finally:
        if num_threads is not None:
            faiss.omp_set_num_threads(old_threads)
    pairs = np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)
    if pairs.shape[0]:
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    return pairs
