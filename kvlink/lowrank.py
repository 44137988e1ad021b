"""Low rank: fewer dimensions per KV head, per message (SVD) or by a calibrated projection.

Two ways to send a (kv_heads, T, head_dim) tensor as a (kv_heads, T, rank) latent:

- `svd_factors`: a truncated SVD of each head's (T, D) matrix of this message.
  The latent U_r S_r AND the basis V_r^T travel; latent @ basis is the best
  rank-r approximation in Frobenius norm (Eckart-Young).
- `ModelProfile`: a projection calibrated once per model (PCA of each
  (layer, K/V, head) over calibration text). Both sides hold the same profile
  file; only the latent travels and the profile is identified by `hash`.

Profile file: ONE safetensors file, float32 tensors

    layer.{l}.{k|v}.basis  (kv_heads, head_dim, r_max)  orthonormal columns, by explained variance
    layer.{l}.{k|v}.mean   (kv_heads, head_dim)

and string metadata: format, version, fingerprint (of the model), layers, r_max, tokens.
The bytes are written by our own canonical serializer (header JSON with sorted
keys, tensors in a fixed order) rather than `safetensors.torch.save`, whose
metadata order follows a Rust HashMap and changes from call to call; so the
same profile always has the same bytes, and `hash` (sha256 of those bytes)
equals the sha256 of the file `save` wrote. Files are read with safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("k", "v")
PROFILE_FORMAT = "kvlink.profile"
PROFILE_VERSION = "1"
ORTHONORMAL_TOL = 1e-3  # |B^T B - I| a loaded basis may show before it is called corrupt

_TENSOR_NAME = re.compile(r"layer\.(\d+)\.([kv])\.(basis|mean)")
_SAFE_FINGERPRINT = re.compile(r"[A-Za-z0-9._-]+")


def _check_rank(rank: Any, limit: int, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank > limit:
        raise ValueError(f"rank {rank!r} exceeds {what} {limit}")
    return rank


def _check_3d(x: Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be (kv_heads, T, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def svd_factors(x: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Per-head truncated SVD: x (H, T, D) -> latent (H, T, r) = U_r S_r and basis (H, r, D) = V_r^T.

    latent @ basis is the best rank-r approximation of each head's (T, D)
    matrix; float32 math on x's device. 1 <= rank <= D. When T < rank the
    matrix has only T components: the extra latent columns and basis rows are
    zeros, so the shapes stay (H, T, r) and (H, r, D). Each component's sign
    is fixed (largest |entry| of its basis row positive), so the result does
    not depend on the SVD backend's sign choice.
    """
    _check_3d(x, "x")
    h, t, d = (int(s) for s in x.shape)
    rank = _check_rank(rank, d, "head_dim")
    latent = torch.zeros(h, t, rank, dtype=torch.float32, device=x.device)
    basis = torch.zeros(h, rank, d, dtype=torch.float32, device=x.device)
    k = min(rank, t)
    if k == 0:
        return latent, basis
    u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)  # (H, T, m), (H, m), (H, m, D); m = min(T, D)
    u, s, vh = u[..., :k], s[:, :k], vh[:, :k]
    peak = vh.abs().argmax(dim=-1, keepdim=True)  # (H, k, 1)
    sign = torch.where(vh.gather(-1, peak) < 0, -1.0, 1.0)  # (H, k, 1)
    latent[..., :k] = u * (s * sign[..., 0])[:, None, :]
    basis[:, :k] = vh * sign
    return latent, basis


def _canonical_bytes(tensors: Sequence[tuple[str, Tensor]], metadata: dict[str, str]) -> bytes:
    """A safetensors file (float32 tensors in the given order, sorted JSON header, 8-byte aligned)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset = 0
    for name, tensor in tensors:
        t = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        raw = t.numpy().astype("<f4", copy=False).tobytes()  # little-endian whatever the host
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header with spaces to align the data
    return struct.pack("<Q", len(blob)) + blob + b"".join(chunks)


def write_canonical(path: str | Path, data: bytes) -> tuple[Path, str]:
    """Write a profile's canonical bytes to `path` atomically (temp file, then rename); (path, sha256 hex of
    `data`, the profile's hash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path, hashlib.sha256(data).hexdigest()


class CanonicalFile:
    """A profile that is one canonical safetensors file, named by the sha256 of its bytes: subclasses give
    `to_bytes` and `what` (the words its messages and logs use)."""

    what: ClassVar[str]

    def to_bytes(self) -> bytes:
        raise NotImplementedError

    @cached_property
    def hash(self) -> str:
        """sha256 hex of the canonical bytes, i.e. of the file `save` writes."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the profile as one safetensors file (atomically: temp file, then rename)."""
        path, self.__dict__["hash"] = write_canonical(path, self.to_bytes())
        logger.info("saved %s %s to %s", self.what, self.hash[:12], path)
        return path


def read_canonical(
    data: bytes, source: str, what: str, fmt: str, version: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a kvlink profile file (`what`: "profile", "predictor profile", ...), checked
    to be a safetensors file of format `fmt` at `version`; any problem raises ValueError naming `source`."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        raw = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{source} is not a valid safetensors file: {exc}") from None
    # safetensors validated the header above, so reading its metadata back is safe.
    (size,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    if metadata.get("format") != fmt:
        raise ValueError(f"{source} is not a kvlink {what} (format {metadata.get('format')!r})")
    if metadata.get("version") != version:
        raise ValueError(
            f"{source}: unsupported {what} version {metadata.get('version')!r}, expected {version!r}"
        )
    return raw, metadata


def _int_metadata(metadata: dict[str, str], key: str, minimum: int) -> int:
    value = metadata.get(key)
    if value is None:
        raise ValueError(f"profile metadata lacks {key!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"profile metadata {key!r} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"profile metadata {key!r} must be >= {minimum}, got {number!r}")
    return number


@dataclass(frozen=True, eq=False)
class ModelProfile(CanonicalFile):
    """A calibrated projection for one model: per (layer, kind) a PCA basis and mean.

    bases[(l, kind)]: (kv_heads, head_dim, r_max) float32, orthonormal columns
    sorted by explained variance (largest first); means[(l, kind)]: (kv_heads, head_dim).
    kind is "k" (keys, after RoPE) or "v". `tokens` is the number of
    calibration tokens. Treat a profile as immutable: `hash` is computed once.
    """

    what: ClassVar[str] = "profile"

    fingerprint: str
    r_max: int
    tokens: int
    bases: dict[tuple[int, str], Tensor]
    means: dict[tuple[int, str], Tensor]

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {self.fingerprint!r}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise ValueError(f"tokens must be a non-negative integer, got {self.tokens!r}")
        if isinstance(self.r_max, bool) or not isinstance(self.r_max, int) or self.r_max < 1:
            raise ValueError(f"r_max must be a positive integer, got {self.r_max!r}")
        layers = 1 + max((key[0] for key in self.bases if isinstance(key[0], int)), default=-1)
        expected = {(layer, kind) for layer in range(max(layers, 1)) for kind in KINDS}
        for name, table in (("basis", self.bases), ("mean", self.means)):
            missing, extra = sorted(expected - set(table)), sorted(set(table) - expected, key=str)
            if missing or extra:
                raise ValueError(
                    f"a profile needs a {name} for every (layer, kind), kind in {KINDS}: "
                    f"missing {missing}, unexpected {extra}"
                )
        h, d, _ = self.bases[(0, "k")].shape
        if self.r_max > d:
            raise ValueError(f"r_max {self.r_max!r} exceeds head_dim {d}")
        for layer, kind in sorted(expected):
            basis, mean = self.bases[(layer, kind)], self.means[(layer, kind)]
            where = f"layer.{layer}.{kind}"
            for name, t, shape in (("basis", basis, (h, d, self.r_max)), ("mean", mean, (h, d))):
                if tuple(t.shape) != shape:
                    raise ValueError(f"{where}.{name} has shape {tuple(t.shape)}, expected {shape}")
                if t.dtype != torch.float32:
                    raise ValueError(f"{where}.{name} has dtype {t.dtype}, expected torch.float32")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{where}.{name} holds non-finite values")
            gram = basis.transpose(1, 2) @ basis  # (H, r, r)
            err = float((gram - torch.eye(self.r_max, device=gram.device)).abs().max())
            if err > ORTHONORMAL_TOL:
                raise ValueError(f"{where}.basis is not orthonormal (max |B^T B - I| = {err:.3g})")

    # --- geometry ----------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.bases) // len(KINDS)

    @property
    def kv_heads(self) -> int:
        return int(self.bases[(0, "k")].shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.bases[(0, "k")].shape[1])

    def check_fingerprint(self, fingerprint: str) -> None:
        """Raise unless this profile was calibrated on the model with `fingerprint`."""
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"profile was calibrated for model {self.fingerprint[:12]!r}, not for {fingerprint[:12]!r}"
            )

    # --- projection ----------------------------------------------------------
    def _entry(self, layer: int, kind: str) -> tuple[Tensor, Tensor]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        return self.bases[(layer, kind)], self.means[(layer, kind)]

    def project(self, x: Tensor, layer: int, kind: str, rank: int) -> Tensor:
        """x (H, T, D) -> latent (H, T, rank) = (x - mean) @ basis[..., :rank], float32 on x's device."""
        _check_3d(x, "x")
        rank = _check_rank(rank, self.r_max, "the profile's r_max")
        basis, mean = self._entry(layer, kind)
        if (x.shape[0], x.shape[2]) != (self.kv_heads, self.head_dim):
            raise ValueError(
                f"x has shape {tuple(x.shape)}, the profile expects ({self.kv_heads}, T, {self.head_dim})"
            )
        b = basis[..., :rank].to(x.device)  # (H, D, r)
        return torch.matmul(x.float() - mean.to(x.device)[:, None, :], b)

    def expand(self, latent: Tensor, layer: int, kind: str) -> Tensor:
        """latent (H, T, r) -> (H, T, D) = latent @ basis[..., :r]^T + mean, float32 on latent's device."""
        _check_3d(latent, "latent")
        rank = _check_rank(int(latent.shape[2]), self.r_max, "the profile's r_max")
        basis, mean = self._entry(layer, kind)
        if latent.shape[0] != self.kv_heads:
            raise ValueError(f"latent has {latent.shape[0]} heads, the profile has {self.kv_heads}")
        b = basis[..., :rank].to(latent.device)  # (H, D, r)
        return torch.matmul(latent.float(), b.transpose(1, 2)) + mean.to(latent.device)[:, None, :]

    def expand_factors(
        self, layer: int, kind: str, rank: int, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        """(basis (H, rank, D), mean (H, D)) on `device`: expand(latent) = latent @ basis + mean.

        The basis is a transposed view of the stored (H, D, r_max) projection, the
        form `kvlink.kernels.dequantize_expand` takes to expand a quantized latent
        in one fused pass.
        """
        rank = _check_rank(rank, self.r_max, "the profile's r_max")
        basis, mean = self._entry(layer, kind)
        return basis[..., :rank].to(device).transpose(1, 2), mean.to(device)

    def to(self, device: torch.device | str) -> ModelProfile:
        """The same profile (same hash) with its tensors on `device`."""
        moved = ModelProfile(
            self.fingerprint,
            self.r_max,
            self.tokens,
            {key: t.to(device) for key, t in self.bases.items()},
            {key: t.to(device) for key, t in self.means.items()},
        )
        if "hash" in self.__dict__:
            moved.__dict__["hash"] = self.__dict__["hash"]
        return moved

    # --- file ----------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "fingerprint": self.fingerprint,
            "layers": str(self.num_layers),
            "r_max": str(self.r_max),
            "tokens": str(self.tokens),
        }

    def to_bytes(self) -> bytes:
        """The canonical file bytes: the same profile always gives the same bytes."""
        tensors: list[tuple[str, Tensor]] = []
        for layer in range(self.num_layers):
            for kind in KINDS:
                tensors.append((f"layer.{layer}.{kind}.basis", self.bases[(layer, kind)]))
                tensors.append((f"layer.{layer}.{kind}.mean", self.means[(layer, kind)]))
        return _canonical_bytes(tensors, self.metadata())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> ModelProfile:
        """Parse and validate profile bytes; any problem raises ValueError naming it."""
        raw, metadata = read_canonical(data, source, "profile", PROFILE_FORMAT, PROFILE_VERSION)
        fingerprint = metadata.get("fingerprint")
        if not fingerprint:
            raise ValueError(f"{source}: profile metadata lacks 'fingerprint'")
        layers = _int_metadata(metadata, "layers", 1)
        r_max = _int_metadata(metadata, "r_max", 1)
        tokens = _int_metadata(metadata, "tokens", 0)

        expected = {
            f"layer.{layer}.{kind}.{part}"
            for layer in range(layers)
            for kind in KINDS
            for part in ("basis", "mean")
        }
        missing = sorted(expected - set(raw))
        if missing:
            raise ValueError(f"{source}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        extra = sorted(set(raw) - expected)
        if extra:
            raise ValueError(f"{source}: unexpected tensors {extra[:4]}{' ...' if len(extra) > 4 else ''}")
        bases: dict[tuple[int, str], Tensor] = {}
        means: dict[tuple[int, str], Tensor] = {}
        for name, tensor in raw.items():
            match = _TENSOR_NAME.fullmatch(name)
            assert match is not None  # every name is one of `expected`
            key = (int(match.group(1)), match.group(2))
            (bases if match.group(3) == "basis" else means)[key] = tensor
        try:
            return cls(fingerprint, r_max, tokens, bases, means)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> ModelProfile:
        """Read a profile file written by `save`, validating names, shapes, dtype, version and orthonormality."""
        path = Path(path)
        data = path.read_bytes()
        profile = cls.from_bytes(data, source=str(path))
        canonical = profile.to_bytes()
        if canonical != data:
            # Valid but not written by `save` (other tool or layout): identify it by its content.
            logger.warning("profile %s is not in canonical layout; its hash is that of its content", path)
        profile.__dict__["hash"] = hashlib.sha256(canonical).hexdigest()
        logger.info("loaded profile %s (r_max %d) from %s", profile.hash[:12], profile.r_max, path)
        return profile


def default_profile_path(fingerprint: str) -> Path:
    """Where the profile of the model with `fingerprint` is kept: <cache_dir>/profiles/<fingerprint>.safetensors."""
    from kvlink.models import cache_dir

    if not _SAFE_FINGERPRINT.fullmatch(fingerprint) or fingerprint in (".", ".."):
        raise ValueError(f"fingerprint must be letters, digits, '.', '_' or '-', got {fingerprint!r}")
    return cache_dir() / "profiles" / f"{fingerprint}.safetensors"


def _token_ids(text: str | Tensor, tokenizer: Any, index: int) -> Tensor:
    if isinstance(text, Tensor):
        if text.dtype.is_floating_point or text.dtype == torch.bool:
            raise ValueError(f"texts[{index}] must hold integer token ids, got dtype {text.dtype}")
        return text.reshape(-1).long()
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError(f"texts[{index}] is a string: calibrate_profile needs a tokenizer for it")
        from kvlink.prompt import encode_text

        return encode_text(tokenizer, text)
    raise ValueError(f"texts[{index}] must be a str or a token-id tensor, got {type(text).__name__}")


def _top_eigenvectors(cov: Tensor, rank: int) -> Tensor:
    """cov (H, D, D) symmetric -> (H, D, rank), columns by decreasing eigenvalue, sign fixed."""
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    top = vectors.flip(-1)[..., :rank]  # (H, D, r)
    peak = top.abs().argmax(dim=1, keepdim=True)  # (H, 1, r)
    sign = torch.where(top.gather(1, peak) < 0, -1.0, 1.0).to(top.dtype)
    return top * sign


def calibrate_profile(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str | Tensor],
    max_rank: int,
    fingerprint: str,
    max_tokens_per_text: int = 1024,
) -> ModelProfile:
    """PCA of every (layer, K/V, head) over the KV caches of `texts`.

    Each text (a string, tokenized without special tokens, or a 1-D tensor of
    token ids, in which case `tokenizer` may be None) is cut to
    `max_tokens_per_text` tokens and prefilled alone. Per (layer, kind) we
    accumulate, in float64, the sum (H, D) and second moment (H, D, D) over
    all tokens, never the tokens themselves; the basis is the top `max_rank`
    eigenvectors of the covariance.
    """
    from kvlink.cache import prefill
    from kvlink.models import geometry_of

    if (
        isinstance(max_tokens_per_text, bool)
        or not isinstance(max_tokens_per_text, int)
        or max_tokens_per_text < 1
    ):
        raise ValueError(f"max_tokens_per_text must be a positive integer, got {max_tokens_per_text!r}")
    geometry = geometry_of(model.config)
    max_rank = _check_rank(max_rank, geometry.head_dim, "head_dim")
    if not texts:
        raise ValueError("calibrate_profile needs at least one text")

    sums: dict[tuple[int, str], Tensor] = {}
    moments: dict[tuple[int, str], Tensor] = {}
    tokens = 0
    started = time.perf_counter()
    every = max(1, len(texts) // 10)
    for index, text in enumerate(texts):
        ids = _token_ids(text, tokenizer, index)[:max_tokens_per_text]
        if ids.numel() == 0:
            logger.warning("calibration text %d is empty after tokenization; skipped", index)
            continue
        kv = prefill(model, ids).kv
        for layer in range(kv.num_layers):
            for kind, x in (("k", kv.keys[layer]), ("v", kv.values[layer])):
                x64 = x.detach().to(torch.float64)  # (H, T, D)
                s = x64.sum(dim=1)  # (H, D)
                m = x64.transpose(1, 2) @ x64  # (H, D, D)
                key = (layer, kind)
                if key in sums:
                    sums[key] += s
                    moments[key] += m
                else:
                    sums[key], moments[key] = s, m
        tokens += int(ids.numel())
        if (index + 1) % every == 0 or index + 1 == len(texts):
            logger.info(
                "calibration: %d/%d texts, %d tokens, %.1f s",
                index + 1,
                len(texts),
                tokens,
                time.perf_counter() - started,
            )
    if tokens == 0:
        raise ValueError("every calibration text was empty: no tokens to calibrate on")

    bases: dict[tuple[int, str], Tensor] = {}
    means: dict[tuple[int, str], Tensor] = {}
    for key in sorted(sums):
        mean = sums[key] / tokens  # (H, D)
        cov = moments[key] / tokens - mean[:, :, None] * mean[:, None, :]  # (H, D, D)
        cov = (cov + cov.transpose(1, 2)) / 2
        bases[key] = _top_eigenvectors(cov, max_rank).to(device="cpu", dtype=torch.float32).contiguous()
        means[key] = mean.to(device="cpu", dtype=torch.float32).contiguous()
    profile = ModelProfile(fingerprint, max_rank, tokens, bases, means)
    logger.info(
        "calibrated profile %s: %d layers, r_max %d, %d tokens in %.1f s",
        profile.hash[:12],
        profile.num_layers,
        max_rank,
        tokens,
        time.perf_counter() - started,
    )
    return profile
