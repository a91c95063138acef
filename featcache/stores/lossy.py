"""The lossy transforms behind the target encodings, as pure numpy functions (testable without any store).

``bitround`` rounds mantissas (numcodecs BitRound); ``int8_*`` quantise per view and channel with an absmax scale;
``topk_*`` keep the K largest logits as log-softmax values and recover dense logits from them the way FKD does
(Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022).
"""
from __future__ import annotations

import numpy as np


def bitround(x: np.ndarray, keepbits: int) -> np.ndarray:
    """Round float mantissas to ``keepbits`` bits (numcodecs BitRound, round-to-nearest-even)."""
    from numcodecs import BitRound

    x = np.ascontiguousarray(x)
    return BitRound(keepbits).encode(x).view(x.dtype).reshape(x.shape)


def int8_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, T, D] float -> (int8 [n, T, D], float32 scale [n, D]) with one absmax scale per view and channel."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-2) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / safe[..., None, :]), -127, 127).astype(np.int8)
    return q, scale


def int8_decode(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 values and their per-channel scales -> float32."""
    return np.asarray(q, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[..., None, :]


def topk_encode(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, C] logits -> (log-softmax values [n, k] float32, class indices [n, k] int64), largest first."""
    logits = np.asarray(logits, dtype=np.float64)
    k = min(k, logits.shape[-1])
    idx = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) + logits.max(-1, keepdims=True)
    return (np.take_along_axis(logits, idx, -1) - lse).astype(np.float32), idx


def topk_probs(values: np.ndarray, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k probabilities and the leftover probability mass (FKD): ``(exp(values), 1 - sum)``.

    Args:
        values: stored log-softmax values of the top-k classes [..., k].
        indices: their class indices (unused; accepted so callers can pass both stored arrays).
    """
    probs = np.exp(np.asarray(values, dtype=np.float64))
    leftover = np.clip(1.0 - probs.sum(-1), 0.0, 1.0)
    return probs.astype(np.float32), leftover.astype(np.float32)


def topk_dense(values: np.ndarray, indices: np.ndarray, classes: int) -> np.ndarray:
    """Dense [..., C] logits whose softmax (T=1) gives the stored top-k probabilities exactly and spreads the
    leftover mass uniformly over the other ``C - k`` classes (FKD's soft-label recovery).

    At temperatures other than 1 this is an approximation: the non-top-k logits are gone.
    """
    probs, leftover = topk_probs(values)
    rest = classes - probs.shape[-1]
    fill = np.log(np.maximum(leftover.astype(np.float64) / max(rest, 1), 1e-30)) if rest else np.zeros_like(leftover)
    out = np.repeat(fill[..., None], classes, axis=-1)
    log_probs = np.log(np.maximum(probs.astype(np.float64), 1e-30))
    np.put_along_axis(out, np.asarray(indices, dtype=np.int64), log_probs, axis=-1)
    return out.astype(np.float32)
