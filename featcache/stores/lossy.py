"""The lossy transforms behind the target encodings, as pure numpy functions (testable without any store).

``bitround`` rounds mantissas (numcodecs BitRound); ``int8_*`` quantise per view and channel with an absmax scale;
``topk_*`` keep the K largest logits as log-softmax values and recover dense logits from them the way FKD does
(Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022); ``pca_*`` are transform
coding (Goyal, "Theoretical foundations of transform coding", IEEE Signal Processing Magazine 2001): rotate each
token onto the layer's principal axes, quantise every coefficient with one uniform step, and let an entropy coder
(the lossless part of the codec) spend bits only where the variance is (reverse water-filling, approximately).
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


# ------------------------------------------------------------------------------------------------ transform coding

#: Largest quantised magnitude: coefficients are stored as zigzag-mapped int8 (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...).
PCA_QMAX = 127
#: Zigzag byte -> coefficient in steps, as float32 (decode is one table lookup per value).
_UNZIGZAG = np.where(np.arange(256) & 1, -((np.arange(256) + 1) >> 1), np.arange(256) >> 1).astype(np.float32)


def pca_zigzag_table() -> np.ndarray:
    """The 256 zigzag bytes as the coefficients they stand for, in steps (float32)."""
    return _UNZIGZAG.copy()


def pca_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit sample [n, T, D] -> (per-token mean [T, D], orthonormal basis [D, D], rms of ``x``), float32.

    The basis columns are the principal axes of the centred tokens by descending variance, each signed so that its
    largest entry is positive (eigenvector signs are otherwise arbitrary across LAPACK builds). A per-token mean
    removes what every view shares at a position (position embeddings, the class token).
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    centred = (x - mean).reshape(-1, x.shape[-1])
    _, vecs = np.linalg.eigh(centred.T @ centred)
    vecs = vecs[:, ::-1]
    peak = vecs[np.abs(vecs).argmax(axis=0), np.arange(vecs.shape[1])]
    vecs = vecs * np.where(peak < 0, -1.0, 1.0)
    return mean.astype(np.float32), vecs.astype(np.float32), float(np.sqrt((x ** 2).mean()))


def pca_coefficients(x: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Tokens [..., T, D] -> their coefficients on ``basis`` [..., T, D] (float32)."""
    return (np.asarray(x, dtype=np.float32) - mean) @ basis


def pca_steps(coef: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Per view and component the quantiser step ``step * 2**e`` with the smallest ``e >= 0`` that keeps every
    coefficient within ``PCA_QMAX`` steps (no clipping, so the error bound holds for any view).

    Returns:
        (exponents uint8 [..., D], steps float32 [..., D]).
    """
    peak = np.abs(coef).max(axis=-2).astype(np.float64)
    e = np.ceil(np.log2(np.maximum(peak / (PCA_QMAX * step), 1.0))).astype(np.int64)
    e += peak > PCA_QMAX * step * np.exp2(e)  # log2 rounding: never leave a coefficient beyond the range
    return e.astype(np.uint8), (np.float32(step) * np.exp2(e)).astype(np.float32)


def pca_encode(x: np.ndarray, mean: np.ndarray, basis: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [n, T, D] -> (zigzag coefficients uint8 [n, T, D], step exponents uint8 [n, D])."""
    coef = pca_coefficients(x, mean, basis)
    e, steps = pca_steps(coef, step)
    q = np.clip(np.rint(coef / steps[..., None, :]), -PCA_QMAX, PCA_QMAX).astype(np.int16)
    return ((q << 1) ^ (q >> 15)).astype(np.uint8), e


def pca_decode(z: np.ndarray, e: np.ndarray, mean: np.ndarray, basis_t: np.ndarray, step: float) -> np.ndarray:
    """Zigzag coefficients [..., T, D] and exponents [..., D] -> float32 tokens; ``basis_t`` is the basis transposed."""
    steps = np.float32(step) * np.exp2(np.asarray(e, dtype=np.float32))
    return (_UNZIGZAG[z] * steps[..., None, :]) @ basis_t + mean


def pca_bound(x: np.ndarray, mean: np.ndarray, basis: np.ndarray, step: float) -> np.ndarray:
    """Per-element absolute error bound [n, T, D] of :func:`pca_encode` + :func:`pca_decode` for tokens ``x``.

    ``|x' - x| <= |r (V V^T - I)| + sum_k |V_ck| step_k / 2`` with ``r = x - mean``: the first term is what the
    stored (fp16-rounded, so not exactly orthonormal) basis leaks, the second the quantisation; a float32 slack of
    ``2**-16`` of the magnitudes involved covers the matrix products.
    """
    r = np.asarray(x, dtype=np.float64) - mean
    v = basis.astype(np.float64)
    _, steps = pca_steps(pca_coefficients(x, mean, basis), step)
    leak = np.abs(r @ v @ v.T - r)
    quant = (steps.astype(np.float64) / 2) @ np.abs(v).T
    scale = np.abs(r) @ np.abs(v) @ np.abs(v).T + np.abs(mean) + quant[..., None, :]
    return leak + quant[..., None, :] + 2.0 ** -16 * scale
