"""Target encodings: how a logical float32 target becomes the arrays a backend stores, and back.

Backends store and return arrays; they never encode. Extraction calls :func:`encode_targets` and hands the named
arrays to a writer; every reader decodes once, in :class:`featcache.stores.base.StoreReader`, with the encoding
recorded per target. The manifest keeps both views:
    ``manifest["targets"][name]  = {"shape": [...per row], "encoding": {"kind": ..., ...}}``     (logical)
    ``manifest["arrays"][stored] = {"shape": [...per row], "dtype": "float16", "compressor": {...}}`` (stored)
A target may be stored as several arrays named ``<target>__<part>`` (``block_0__scale``, ``logits__topk_indices``);
``__`` is the separator because it is legal in Zarr, HDF5 and tar member names and never appears in a target name.

One registered class per encoding ``kind`` (the registry key is the kind written in the manifest):
    ``float``     the storage dtype only (:mod:`~featcache.stores.precision`: fp32, fp16, bf16 bits).
    ``bitround``  lossy, block targets (``--codec bitround:N``): numcodecs BitRound keeps N mantissa bits, then zstd:3
        unless a lossless part is given. Bound ``|x' - x| <= 2**-(N+1) * |x|`` on top of the dtype's own rounding.
    ``int8``      lossy, block targets (``--codec int8``): per-view, per-channel absmax quantisation, ``block_i`` int8
        [rows, T, D] + ``block_i__scale`` float32 [rows, D], ``scale = absmax_c / 127``; bound ``scale_c / 2``. One
        scale per channel (not per token) because ViT features have outlier channels: a per-token scale is set by the
        outliers and crushes the normal channels.
    ``topk``      logits (``--topk K``): only the top K as log-softmax values (storage dtype) + class indices
        (int16/int32); dense decode as in FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
        Recognition", ECCV 2022), see :func:`topk_dense`.
    ``pca``       lossy, block targets (``--codec pca:S``): transform coding with a per-layer codebook fitted on the
        cache's own features and kept in the spec (per-token mean [T, D], principal axes [D, D], both fp16): every
        token's coefficients on all D axes, one uniform step ``S * rms`` (raised by powers of two per view and
        component only where a coefficient would pass 127 steps), ``block_i`` uint8 [T + 1, D]: zigzag coefficients,
        then the exponents as the last row; then blosc-zstd + bitshuffle unless a lossless part is given, which
        spends bits only on the components whose variance exceeds the step. Bound:
        :func:`~featcache.stores.lossy.pca_bound`.
Lossless compressors (the rest of ``--codec``) live in :mod:`~featcache.stores.codecs`.
"""
from __future__ import annotations

import base64
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..errors import CacheError, ConfigError
from ..manifest import is_block
from ..registry import Registry
from .codecs import parse_lossless
from .lossy import (bitround, int8_decode, int8_encode, pca_bound, pca_decode, pca_encode, pca_fit,
                    pca_zigzag_table, topk_dense, topk_encode, topk_probs)
from .precision import (MANTISSA_BITS, MIN_NORMAL_EXPONENT, UNIT_ROUNDOFF, VERIFY_RTOL, from_storage,
                        rounding_bound, rounding_floor, storage_dtype, to_storage)


class Encoding(ABC):
    """One encoding kind, bound to the spec a manifest records for a target (``targets[name]["encoding"]``).

    Attributes:
        name: the kind (set by registration), the value of ``spec["kind"]``.
        lossy: decoding does not give back what was encoded (beyond the storage dtype's rounding).
        elementwise: the decode approximates every encoded value, so an element-wise error (relative L2, max abs,
            :meth:`bound`) means something; false for top-k logits, whose loss is the dropped probability mass.
        usage: how the ``--codec`` string selects it as its lossy part (None: not selectable there).
        default_compressor: the lossless ``--codec`` part implied when none is given (None: ``none``).
        fitted: encoding needs a codebook fitted on sample rows first (:meth:`fit`); the spec holds it.
    """

    name: ClassVar[str]
    lossy: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True
    usage: ClassVar[str | None] = None
    default_compressor: ClassVar[str | None] = None
    fitted: ClassVar[bool] = False

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec

    @classmethod
    @abstractmethod
    def describe(cls, storage: Mapping[str, Any], option: Mapping[str, Any] | None) -> dict[str, Any]:
        """The spec recorded for a target under ``storage``; ``option`` is the parsed lossy ``--codec`` part.

        Raises:
            ConfigError: for settings this encoding cannot apply.
        """

    @classmethod
    def parse_option(cls, part: str) -> dict[str, Any]:
        """A lossy ``--codec`` part naming this encoding (``bitround:7``) -> its option dict."""
        raise ConfigError(f"{cls.name!r} is not a --codec part")

    @classmethod
    def fit(cls, spec: Mapping[str, Any], sample: np.ndarray) -> dict[str, Any]:
        """``spec`` completed with the codebook fitted on ``sample`` (logical float32 rows [n, ...])."""
        return dict(spec)

    def label(self) -> str:
        """Short text for tables: the kind and its settings (``bitround:7 fp16``)."""
        return self.name + (f" {self.spec['dtype']}" if "dtype" in self.spec else "")

    @abstractmethod
    def arrays(self, name: str, shape: list[int]) -> dict[str, dict[str, Any]]:
        """Stored arrays (name -> per-row ``shape`` and numpy ``dtype``) of target ``name`` of per-row ``shape``."""

    @abstractmethod
    def encode(self, name: str, value: np.ndarray, classes: int | None = None) -> dict[str, np.ndarray]:
        """Logical float32 values [n, ...] -> the stored arrays [n, ...]; ``classes`` is the logits width."""

    @abstractmethod
    def decode(self, name: str, stored: Mapping[str, np.ndarray], shape: Sequence[int]) -> np.ndarray:
        """Stored arrays -> logical float32 values; ``shape`` is the target's per-row shape."""

    def decode_torch(self, name: str, stored: Mapping[str, Any], shape: Sequence[int]) -> Any:
        """:meth:`decode` in torch, on the stored arrays' device (batched [n, ...]): the training loop copies the
        stored bytes to the GPU and decodes there (``--decode device``). The default decodes on the host."""
        host = {k: v.cpu().numpy() for k, v in stored.items()}
        return _torch().from_numpy(self.decode(name, host, shape)).to(next(iter(stored.values())).device)

    def bound(self, reference: np.ndarray) -> np.ndarray:
        """The stated per-element absolute error bound for encoding ``reference``."""
        raise ConfigError(f"encoding {self.name!r} has no element-wise error bound")

    def reference(self, name: str, fresh: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """What freshly recomputed values should decode to (``featcache verify`` compares the cache with it)."""
        return np.asarray(fresh, dtype=np.float32)

    def stored_error(self, name: str, stored: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        """The loss measurable from stored rows alone, without a reference (None: none is)."""
        return None


ENCODINGS: Registry[type[Encoding]] = Registry("target encoding")
#: Views a fitted codebook is fitted on (``featcache convert`` and ``extract`` spread them over the cache).
FIT_ROWS = 512


# ------------------------------------------------------------------------------------------------ the encodings

@ENCODINGS.register("float")
class Float(Encoding):
    """The storage dtype and nothing else."""

    @classmethod
    def describe(cls, storage: Mapping[str, Any], option: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"kind": "float", "dtype": storage["dtype"]}

    def arrays(self, name: str, shape: list[int]) -> dict[str, dict[str, Any]]:
        return {name: {"shape": shape, "dtype": storage_dtype(self.spec["dtype"])}}

    def encode(self, name: str, value: np.ndarray, classes: int | None = None) -> dict[str, np.ndarray]:
        return {name: to_storage(value, self.spec["dtype"])}

    def decode(self, name: str, stored: Mapping[str, np.ndarray], shape: Sequence[int]) -> np.ndarray:
        return from_storage(stored[name], self.spec["dtype"])

    def decode_torch(self, name: str, stored: Mapping[str, Any], shape: Sequence[int]) -> Any:
        torch, x = _torch(), stored[name]
        if self.spec["dtype"] == "bf16":  # the upper half of a float32 (uint16 arrives as int16 or uint16)
            return ((x.to(torch.int32) & 0xFFFF) << 16).view(torch.float32)
        return x.float()

    def bound(self, reference: np.ndarray) -> np.ndarray:
        return rounding_bound(reference, self.spec["dtype"])


@ENCODINGS.register("bitround")
class Bitround(Float):
    """Mantissas rounded to ``keepbits`` bits (numcodecs BitRound, round-to-nearest-even), so zstd compresses them.

    Needs fp32 (N <= 23) or fp16 (N <= 10): BitRound works on IEEE floats and bf16 is stored as uint16 bits.
    """

    lossy = True
    usage = "bitround:N"
    default_compressor = "zstd:3"

    @classmethod
    def parse_option(cls, part: str) -> dict[str, Any]:
        fields = part.split(":")
        if len(fields) != 2 or not fields[1].isdigit():
            raise ConfigError(f"bad lossy codec {part!r}; use {lossy_usage()} (N: mantissa bits kept)")
        return {"name": "bitround", "keepbits": int(fields[1])}

    @classmethod
    def describe(cls, storage: Mapping[str, Any], option: Mapping[str, Any] | None) -> dict[str, Any]:
        dtype, n = storage["dtype"], int(option["keepbits"])
        if dtype not in MANTISSA_BITS:
            raise ConfigError(f"--codec bitround needs --dtype fp32 or fp16 (numcodecs BitRound rounds IEEE floats; "
                              f"bf16 is stored as uint16 bits), got --dtype {dtype}")
        if not 0 < n <= MANTISSA_BITS[dtype]:
            raise ConfigError(f"bitround:{n} must keep 1..{MANTISSA_BITS[dtype]} mantissa bits for {dtype}")
        return {"kind": "bitround", "dtype": dtype, "keepbits": n, "bound": f"rel <= 2**-{n + 1} (+ dtype rounding)",
                "verify_rtol": 2.0 ** -(n + 1) + VERIFY_RTOL[dtype]}

    def encode(self, name: str, value: np.ndarray, classes: int | None = None) -> dict[str, np.ndarray]:
        return {name: bitround(to_storage(value, self.spec["dtype"]), self.spec["keepbits"])}

    def label(self) -> str:
        return f"bitround:{self.spec['keepbits']} {self.spec['dtype']}"

    def bound(self, reference: np.ndarray) -> np.ndarray:
        dtype, keep = self.spec["dtype"], self.spec["keepbits"]
        ref = np.abs(np.asarray(reference, dtype=np.float64))
        rounding = (1 + UNIT_ROUNDOFF[dtype]) * (1 + 2.0 ** -(keep + 1)) - 1
        # Near zero: the dtype's own floor, then BitRound's half spacing at the smallest normal exponent on top.
        return ref * rounding + rounding_floor(dtype) + 2.0 ** (MIN_NORMAL_EXPONENT[dtype] - keep - 1)


@ENCODINGS.register("int8")
class Int8(Encoding):
    """Per-view, per-channel absmax int8: ``q = clip(rint(x / scale), -127, 127)``, ``scale_c = absmax_c / 127``."""

    lossy = True
    usage = "int8"

    @classmethod
    def parse_option(cls, part: str) -> dict[str, Any]:
        if part != "int8":
            raise ConfigError(f"bad lossy codec {part!r}; use {lossy_usage()}")
        return {"name": "int8"}

    @classmethod
    def describe(cls, storage: Mapping[str, Any], option: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"kind": "int8", "scale": "absmax_per_channel", "bound": "abs <= scale/2 = absmax_c/254",
                "verify_rtol": 0.03}

    def arrays(self, name: str, shape: list[int]) -> dict[str, dict[str, Any]]:
        return {name: {"shape": shape, "dtype": "int8"}, f"{name}__scale": {"shape": shape[-1:], "dtype": "float32"}}

    def encode(self, name: str, value: np.ndarray, classes: int | None = None) -> dict[str, np.ndarray]:
        q, scale = int8_encode(value)
        return {name: q, f"{name}__scale": scale}

    def decode(self, name: str, stored: Mapping[str, np.ndarray], shape: Sequence[int]) -> np.ndarray:
        return int8_decode(stored[name], stored[f"{name}__scale"])

    def decode_torch(self, name: str, stored: Mapping[str, Any], shape: Sequence[int]) -> Any:
        return stored[name].float() * stored[f"{name}__scale"].float()[..., None, :]

    def bound(self, reference: np.ndarray) -> np.ndarray:
        scale = np.abs(np.asarray(reference, dtype=np.float64)).max(axis=-2) / 127.0
        return scale[..., None, :] / 2 * (1 + 1e-6) + 1e-30


@ENCODINGS.register("topk")
class TopK(Encoding):
    """The K largest logits as log-softmax values (T = 1) + their class indices; the rest is the leftover mass."""

    lossy = True
    elementwise = False

    @classmethod
    def describe(cls, storage: Mapping[str, Any], option: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"kind": "topk", "dtype": storage["dtype"], "k": int(storage["topk"]), "values": "log_softmax"}

    def arrays(self, name: str, shape: list[int]) -> dict[str, dict[str, Any]]:
        k = min(self.spec["k"], shape[-1])
        return {f"{name}__topk_values": {"shape": [k], "dtype": storage_dtype(self.spec["dtype"])},
                f"{name}__topk_indices": {"shape": [k], "dtype": _topk_index_dtype(shape[-1])}}

    def encode(self, name: str, value: np.ndarray, classes: int | None = None) -> dict[str, np.ndarray]:
        values, indices = topk_encode(value, self.spec["k"])
        classes = classes or np.asarray(value).shape[-1]
        return {f"{name}__topk_values": to_storage(values, self.spec["dtype"]),
                f"{name}__topk_indices": indices.astype(_topk_index_dtype(classes))}

    def decode(self, name: str, stored: Mapping[str, np.ndarray], shape: Sequence[int]) -> np.ndarray:
        values = from_storage(stored[f"{name}__topk_values"], self.spec["dtype"])
        return topk_dense(values, stored[f"{name}__topk_indices"], int(shape[-1]))

    def label(self) -> str:
        return f"topk:{self.spec['k']} {self.spec['dtype']}"

    def reference(self, name: str, fresh: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        # The dense decode keeps only the top k, so compare with the fresh logits' top k decoded the same way.
        return self.decode(name, self.encode(name, fresh, int(shape[-1])), shape)

    def stored_error(self, name: str, stored: Mapping[str, np.ndarray]) -> dict[str, Any]:
        values = from_storage(stored[f"{name}__topk_values"], self.spec["dtype"])
        leftover = topk_probs(values.astype(np.float32))[1]
        return {"leftover_mean": float(leftover.mean()), "leftover_max": float(leftover.max()), "rows": len(values)}


def _torch() -> Any:
    import torch  # only decode_torch needs it: the stores stay importable (and `featcache --help` fast) without it

    return torch


def _topk_index_dtype(classes: int) -> str:
    return "int16" if classes <= np.iinfo(np.int16).max else "int32"


#: Multiply-adds of a pca decode below which numpy is faster than torch (a 17 x 96 demo view: 0.2M; DeiT III-S: 29M).
SMALL_PRODUCT = 2 ** 20


@ENCODINGS.register("pca")
class Pca(Encoding):
    """Transform coding with a fitted per-layer codebook (``--codec pca:S``; :mod:`~featcache.stores.lossy`).

    ``S`` is the quantiser step as a fraction of the layer's rms over the fit sample: the relative L2 error is about
    ``S / sqrt(12)`` where the components are coarser than the step, less where they are not; element-wise it is
    within :func:`~featcache.stores.lossy.pca_bound`.
    """

    lossy = True
    usage = "pca:S"
    default_compressor = "blosc-zstd:5:bitshuffle"
    fitted = True

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self._device_codebooks: dict[Any, tuple[Any, Any, Any]] = {}
        if "basis" in spec:  # decoded once per process: the reader keeps one Encoding per target
            self.mean, self.basis = unpack_array(spec["mean"]), unpack_array(spec["basis"])
            self.basis_t = np.ascontiguousarray(self.basis.T)
            self.delta = float(spec["step"]) * float(spec["rms"])

    @classmethod
    def parse_option(cls, part: str) -> dict[str, Any]:
        fields = part.split(":")
        try:
            step = float(fields[1]) if len(fields) == 2 else 0.0
        except ValueError:
            step = 0.0
        if not 0 < step <= 4:
            raise ConfigError(f"bad lossy codec {part!r}; use {lossy_usage()} (S in (0, 4]: the quantiser step as a "
                              "fraction of the layer's rms, e.g. pca:0.3)")
        return {"name": "pca", "step": step}

    @classmethod
    def describe(cls, storage: Mapping[str, Any], option: Mapping[str, Any] | None) -> dict[str, Any]:
        step = float(option["step"])
        return {"kind": "pca", "step": step, "bound": "abs <= |r (V V^T - I)| + sum_k |V_ck| step_k / 2, "
                "step_k = S rms 2**e_k; relL2 ~ S/sqrt(12)", "verify_rtol": step / 2}

    @classmethod
    def fit(cls, spec: Mapping[str, Any], sample: np.ndarray) -> dict[str, Any]:
        mean, basis, rms = pca_fit(sample)
        return dict(spec, rms=rms, fit_rows=int(len(sample)), mean=pack_array(mean), basis=pack_array(basis))

    def label(self) -> str:
        return f"pca:{self.spec['step']:g}"

    def arrays(self, name: str, shape: list[int]) -> dict[str, dict[str, Any]]:
        # One array, the exponents as its last row: a separate one would cost a tar member (wds) or a shard index
        # entry per view, and be all zeros, which Zarr does not write at all.
        return {name: {"shape": [shape[0] + 1, *shape[1:]], "dtype": "uint8"}}

    def encode(self, name: str, value: np.ndarray, classes: int | None = None) -> dict[str, np.ndarray]:
        self._check_fitted(name)
        z, e = pca_encode(value, self.mean, self.basis, self.delta)
        return {name: np.concatenate([z, e[..., None, :]], axis=-2)}

    def decode(self, name: str, stored: Mapping[str, np.ndarray], shape: Sequence[int]) -> np.ndarray:
        # Large products in torch: one intra-op thread in DataLoader workers, where numpy's BLAS would start its own
        # thread pool in every worker and oversubscribe the cores. Small ones (BLAS runs them on one thread) in numpy,
        # whose per-call overhead is a few times lower.
        self._check_fitted(name)
        packed = stored[name]
        if packed.size * packed.shape[-1] <= SMALL_PRODUCT:
            return pca_decode(packed[..., :-1, :], packed[..., -1, :], self.mean, self.basis_t, self.delta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only pread/mmap buffers: only read here
            tensor = _torch().from_numpy(np.asarray(packed))
        return self._decode(tensor, prune=tensor.ndim == 2).numpy()

    def decode_torch(self, name: str, stored: Mapping[str, Any], shape: Sequence[int]) -> Any:
        self._check_fitted(name)
        return self._decode(stored[name], prune=False)

    def _decode(self, packed: Any, prune: bool) -> Any:
        """``x' = (q * step * 2**e) @ basis^T + mean``; ``prune`` (one view on the CPU) multiplies only the
        components that are non-zero in this view, which is most of the work saved in trained networks."""
        torch = _torch()
        lut, mean, basis_t = self._on(packed.device)
        coef = lut[packed[..., :-1, :].long()]
        exponents = packed[..., -1:, :]
        if packed.device.type != "cpu" or bool(exponents.any()):  # nearly always all zero: skip the multiply
            coef = coef * torch.exp2(exponents.float())
        if prune:
            active = (packed[:-1] != 0).any(dim=0)
            if int(active.sum()) < 0.75 * len(active):
                return torch.addmm(mean, coef[:, active], basis_t[active])
        return coef @ basis_t + mean

    def _on(self, device: Any) -> tuple[Any, Any, Any]:
        """The zigzag table times the step, and the codebook, as float32 tensors on ``device`` (moved once)."""
        if device not in self._device_codebooks:
            torch = _torch()
            lut = pca_zigzag_table() * np.float32(self.delta)
            self._device_codebooks[device] = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (
                lut, self.mean, self.basis_t))
        return self._device_codebooks[device]

    def bound(self, reference: np.ndarray) -> np.ndarray:
        return pca_bound(reference, self.mean, self.basis, self.delta)

    def _check_fitted(self, name: str) -> None:
        if "basis" not in self.spec:
            raise ConfigError(f"target {name!r}: --codec pca needs a codebook fitted on the features first; make the "
                              "cache with `featcache extract` or `featcache convert`, which fit it")


def pack_array(x: np.ndarray) -> dict[str, Any]:
    """A codebook array as JSON: little-endian float16 bytes, base64 (``{"dtype", "shape", "base64"}``)."""
    data = np.ascontiguousarray(x, dtype="<f2")
    return {"dtype": "float16", "shape": list(data.shape), "base64": base64.b64encode(data.tobytes()).decode("ascii")}


def unpack_array(packed: Mapping[str, Any]) -> np.ndarray:
    """:func:`pack_array`'s JSON -> float32 array.

    Raises:
        CacheError: when the bytes do not match the recorded shape (a damaged manifest).
    """
    raw = base64.b64decode(packed["base64"])
    shape = tuple(int(s) for s in packed["shape"])
    if packed.get("dtype") != "float16" or len(raw) != 2 * int(np.prod(shape)):
        raise CacheError(f"codebook array of shape {list(shape)} has {len(raw)} bytes of {packed.get('dtype')!r}; "
                         "the manifest is damaged: re-run the `featcache convert` or `featcache extract` that made it")
    return np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------ specs

def lossy_usage() -> str:
    """The lossy ``--codec`` parts the registry offers, for messages and help (``bitround:N or int8``)."""
    return " or ".join(ENCODINGS.get(n).usage for n in ENCODINGS if ENCODINGS.get(n).usage)


def parse_codec(spec: str | None) -> dict[str, Any]:
    """``--codec`` string -> ``{"lossy": None | option of a lossy encoding, "compressor": {...}}``.

    At most one lossy part (an encoding with a ``usage``) and one lossless part (a compressor) joined by ``+``;
    a lossy part alone implies its encoding's ``default_compressor`` (bitround: zstd:3, its rounded mantissas are
    only worth it compressed; pca: blosc-zstd with bitshuffle, which codes the zigzag bytes' zero bit-planes away).

    Raises:
        ConfigError: naming the bad part and the accepted forms.
    """
    lossy, lossless = None, None
    for part in (spec or "none").lower().split("+"):
        kind = part.split(":")[0]
        if kind in ENCODINGS and ENCODINGS.get(kind).usage:
            if lossy is not None:
                raise ConfigError(f"--codec {spec!r} has two lossy parts; use one of {lossy_usage()}")
            lossy = ENCODINGS.get(kind).parse_option(part)
        elif lossless is None:
            lossless = parse_lossless(part)
        else:
            raise ConfigError(f"--codec {spec!r} has two lossless parts; join at most one lossy and one lossless part")
    if lossless is None:
        lossless = parse_lossless((lossy and ENCODINGS.get(lossy["name"]).default_compressor) or "none")
    return {"lossy": lossy, "compressor": lossless}


def encoding(spec: Mapping[str, Any]) -> Encoding:
    """The encoding a manifest records (``targets[name]["encoding"]``), ready to encode and decode.

    Raises:
        CacheError: for a kind this featcache does not know (a cache from a newer version).
    """
    if spec.get("kind") not in ENCODINGS:
        raise CacheError(f"unknown target encoding {dict(spec)!r} (known kinds: {', '.join(ENCODINGS)}); is this "
                         "cache from a newer featcache?")
    return ENCODINGS.get(spec["kind"])(spec)


def target_encoding(name: str, storage: Mapping[str, Any]) -> dict[str, Any]:
    """The encoding spec recorded for target ``name`` under the storage settings.

    Logits take top-k when ``storage["topk"]`` is set; block targets take the lossy part of the codec; everything
    else is stored as plain floats of the storage dtype.

    Raises:
        ConfigError: for settings that cannot apply (bitround on bf16, too many kept bits, bad codec or dtype).
    """
    storage_dtype(storage["dtype"])
    lossy = parse_codec(storage.get("codec"))["lossy"]
    if name == "logits" and storage.get("topk"):
        kind = "topk"
    else:
        kind = lossy["name"] if lossy is not None and is_block(name) else "float"
    return ENCODINGS.get(kind).describe(storage, lossy)


def unfitted(targets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Targets of a ``manifest["targets"]`` section whose encoding still needs its codebook (:meth:`Encoding.fit`)."""
    return [n for n, t in targets.items() if ENCODINGS.get(t["encoding"]["kind"]).fitted
            and "fit_rows" not in t["encoding"]]


def fit_targets(targets: Mapping[str, Mapping[str, Any]], samples: Mapping[str, np.ndarray]
                ) -> dict[str, dict[str, Any]]:
    """The ``targets`` section with the codebooks of the targets in ``samples`` fitted on those rows."""
    out = {n: dict(t) for n, t in targets.items()}
    for name, sample in samples.items():
        spec = out[name]["encoding"]
        out[name]["encoding"] = ENCODINGS.get(spec["kind"]).fit(spec, np.asarray(sample, dtype=np.float32))
    return out


def fit_sample_rows(valid: np.ndarray, rows: int = FIT_ROWS) -> list[int]:
    """The rows a codebook is fitted on: ``rows`` valid rows spread evenly over the cache (every view if fewer)."""
    candidates = np.flatnonzero(np.asarray(valid) == 1)
    if len(candidates) <= rows:
        return candidates.tolist()
    return candidates[np.linspace(0, len(candidates) - 1, rows).round().astype(np.int64)].tolist()


def targets_section(targets: Mapping[str, Sequence[int]], storage: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``manifest["targets"]`` for logical targets of the given per-row shapes."""
    return {name: {"shape": [int(s) for s in shape], "encoding": target_encoding(name, storage)}
            for name, shape in targets.items()}


def array_specs(targets: Mapping[str, Sequence[int]], storage: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``manifest["arrays"]``: stored arrays (name -> per-row shape, dtype, compressor) for logical targets."""
    compressor = parse_codec(storage.get("codec"))["compressor"]
    if storage.get("compressor") and compressor["name"] == "none":
        compressor = dict(storage["compressor"])  # legacy: an explicit compressor spec
    specs: dict[str, dict[str, Any]] = {}
    for name, shape in targets.items():
        specs.update(encoding(target_encoding(name, storage)).arrays(name, [int(s) for s in shape]))
    for spec in specs.values():
        spec["compressor"] = dict(compressor)
    return specs


def stored_names(manifest: Mapping[str, Any], names: list[str] | None = None) -> list[str]:
    """Which stored arrays must be read to decode the targets ``names`` (all targets by default)."""
    wanted = names or list(manifest["targets"])
    return [n for n in manifest["arrays"] if n.split("__")[0] in wanted]


# ------------------------------------------------------------------------------------------------ encode / decode

def encode_target(name: str, value: np.ndarray, spec: Mapping[str, Any], classes: int | None = None
                  ) -> dict[str, np.ndarray]:
    """One logical target [n, ...] -> its stored arrays, under encoding ``spec``."""
    return encoding(spec).encode(name, value, classes)


def encode_targets(targets: Mapping[str, np.ndarray], storage: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Logical float32 targets [n, ...] -> stored arrays [n, ...]."""
    out: dict[str, np.ndarray] = {}
    for name, value in targets.items():
        out.update(encode_target(name, value, target_encoding(name, storage)))
    return out


def encode_with(targets: Mapping[str, np.ndarray], manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Logical float32 targets [n, ...] -> stored arrays, with the encodings ``manifest["targets"]`` records (fitted
    codebooks included; :func:`encode_targets` derives unfitted ones from the storage settings)."""
    out: dict[str, np.ndarray] = {}
    for name, value in targets.items():
        entry = manifest["targets"][name]
        out.update(encode_target(name, value, entry["encoding"], classes=int(entry["shape"][-1])))
    return out


def decode_target(name: str, stored: Mapping[str, np.ndarray], entry: Mapping[str, Any]) -> np.ndarray:
    """Stored arrays -> one logical float32 target; ``entry`` is ``manifest["targets"][name]``."""
    return encoding(entry["encoding"]).decode(name, stored, entry.get("shape", ()))


def decode_targets(stored: Mapping[str, np.ndarray], manifest: Mapping[str, Any],
                   names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Stored arrays -> logical float32 targets (only ``names`` if given)."""
    return {name: decode_target(name, stored, manifest["targets"][name]) for name in names or list(manifest["targets"])}


def verify_reference(name: str, fresh: np.ndarray, entry: Mapping[str, Any]) -> np.ndarray:
    """What a freshly recomputed target should decode to, for ``featcache verify`` (see :meth:`Encoding.reference`)."""
    return encoding(entry["encoding"]).reference(name, fresh, entry["shape"])


def error_bound(spec: Mapping[str, Any], reference: np.ndarray) -> np.ndarray:
    """The stated per-element absolute error bound of encoding ``spec`` for ``reference`` values."""
    return encoding(spec).bound(reference)


# ------------------------------------------------------------------------------------------------ measured error

class ErrorMeter:
    """Relative L2 error ``||x' - x|| / ||x||`` and max absolute error per target, accumulated over batches of
    rows (``convert`` and ``verify`` measure whole caches this way; :func:`measure_error` one array)."""

    def __init__(self, names: list[str]):
        self.stats = {n: {"sq_err": 0.0, "sq_ref": 0.0, "max_abs": 0.0, "rows": 0} for n in names}

    def add(self, name: str, reference: np.ndarray, decoded: np.ndarray) -> None:
        """Account one batch of rows of target ``name``."""
        ref = np.asarray(reference, dtype=np.float64)
        diff = np.asarray(decoded, dtype=np.float64) - ref
        s = self.stats[name]
        s["sq_err"] += float((diff ** 2).sum())
        s["sq_ref"] += float((ref ** 2).sum())
        s["max_abs"] = max(s["max_abs"], float(np.abs(diff).max()) if diff.size else 0.0)
        s["rows"] += len(ref)

    def report(self) -> dict[str, dict[str, float]]:
        """Target -> ``{"rel_l2", "max_abs", "rows"}`` over everything added so far."""
        # max(.., 1e-30): an error against an all-zero reference must still show, not read as 0.
        return {n: {"rel_l2": float(np.sqrt(s["sq_err"] / max(s["sq_ref"], 1e-30))),
                    "max_abs": s["max_abs"], "rows": s["rows"]} for n, s in self.stats.items()}


def measure_error(reference: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """Relative L2 error ``||x' - x|| / ||x||`` and max absolute error of a decoded target."""
    meter = ErrorMeter(["x"])
    meter.add("x", reference, decoded)
    out = meter.report()["x"]
    return {"rel_l2": out["rel_l2"], "max_abs": out["max_abs"]}
