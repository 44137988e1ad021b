"""Real model geometries with seeded random weights: ``random:NAME[:layers=N][:seed=S]``.

A benchmark of transfer and decode cost needs the KV shape, the layer count
and the matmul sizes of a real model, not its weights. ``random:llama-3.1-8b``
builds the public architecture from a transformers config written here (no
download), fills its weights from a seed directly on the target device, and
pairs it with the embedded model's tokenizer (kvlink.models; the vocabulary
of the random model is that tokenizer's, so ids fit and the embedding stays
small). Its answers mean nothing: random weights are for timing only.

Names::

    random:llama-3.1-8b                    all 32 layers, seed 0
    random:llama-3.1-70b:layers=20         the first 20 of 80 layers (70B does not fit one GPU)
    random:qwen2.5-7b:seed=3:layers=4      options in any order, each at most once
    random:tiny-llama, random:tiny-qwen2   2 small layers, for tests of mechanics

The weights are a pure function of (seed, parameter name, shape): every
matrix is read from one pool of POOL_SIZE seeded values (approximately normal,
std INIT_STD) starting at an offset hashed from (seed, parameter name) and
wrapping around; norms are 1 and biases 0. The pool is integer arithmetic in
numpy, so a sender on CPU and a receiver on GPU, in fp32 or bf16, hold the
same weights (up to the cast), and `layers=N` gives exactly the first N layers
of the full model. Filling is a few large copies per matrix, memory bound: no
random number generator runs over billions of parameters (the price: a matrix
larger than the pool repeats it, its rows being shifted windows of one
sequence, which costs the same FLOPs and bytes as any other weights).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvlink.models import Geometry

PREFIX = "random:"
OPTIONS = ("layers", "seed")
MODEL_TYPES = ("llama", "qwen2")

INIT_SCHEME = "pool-splitmix64-irwinhall4-v1"  # names the fill below; part of the fingerprint
INIT_STD = 0.02
POOL_SIZE = 4_194_301  # a prime: a row of any width starts at a different pool offset than the rows near it


@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.1's frequency-dependent RoPE scaling (transformers rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class Architecture:
    """The numbers of one public model's config.json that shape compute and the KV cache.

    `source` is the HF model id the numbers come from; `source_vocab_size` and
    `source_params` (the public parameter count) are documentation and a check
    of the table: the random model uses the embedded tokenizer's vocabulary.
    Qwen2 has q/k/v biases (and no o_proj bias) in every transformers version;
    `attention_bias` records it, transformers' Qwen2 takes no flag for it.
    """

    name: str
    source: str
    model_type: str  # one of MODEL_TYPES
    hidden_size: int
    intermediate_size: int
    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float
    attention_bias: bool
    tie_word_embeddings: bool
    source_vocab_size: int
    source_params: float
    rope_scaling: Llama3Rope | None = None

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"{self.name}: model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for key in ("hidden_size", "intermediate_size", "num_layers", "q_heads", "kv_heads", "head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive int, got {value!r}")
        if self.q_heads % self.kv_heads:
            raise ValueError(
                f"{self.name}: q_heads {self.q_heads!r} is not a multiple of kv_heads {self.kv_heads!r}"
            )
        if self.model_type == "qwen2":
            # transformers' Qwen2 derives head_dim from hidden_size and always has q/k/v biases.
            if self.q_heads * self.head_dim != self.hidden_size:
                raise ValueError(
                    f"{self.name}: qwen2 needs q_heads x head_dim == hidden_size, got "
                    f"{self.q_heads} x {self.head_dim} != {self.hidden_size}"
                )
            if not self.attention_bias:
                raise ValueError(f"{self.name}: qwen2 always has q/k/v attention biases")

    def geometry(self, layers: int | None = None) -> Geometry:
        """The KV-cache shape of this architecture with `layers` layers (all by default)."""
        return Geometry(layers or self.num_layers, self.kv_heads, self.head_dim, self.q_heads)

    def config(
        self,
        vocab_size: int,
        layers: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> Any:
        """A transformers config of this architecture (LlamaConfig or Qwen2Config) with `layers` layers."""
        from transformers import LlamaConfig, Qwen2Config

        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            s = self.rope_scaling
            rope = {
                "rope_type": "llama3",
                "rope_theta": self.rope_theta,
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
        common: dict[str, Any] = dict(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=layers or self.num_layers,
            num_attention_heads=self.q_heads,
            num_key_value_heads=self.kv_heads,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters=rope,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        if self.model_type == "llama":
            return LlamaConfig(
                **common, head_dim=self.head_dim, attention_bias=self.attention_bias, mlp_bias=False
            )
        return Qwen2Config(**common, use_sliding_window=False)

    def param_count(self, vocab_size: int, layers: int | None = None) -> int:
        """Parameters of the built model, in closed form (tied embeddings counted once)."""
        h, q, kv = self.hidden_size, self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h  # q, k, v, o projections
        if self.attention_bias:
            attention += q + 2 * kv
        per_layer = attention + 3 * h * self.intermediate_size + 2 * h  # + gate/up/down + two norms
        embeddings = vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return (layers or self.num_layers) * per_layer + embeddings + h  # + the final norm


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add `arch` to the registry under its name; a name registered twice raises."""
    if arch.name in ARCHITECTURES:
        raise ValueError(f"random architecture {arch.name!r} is already registered")
    ARCHITECTURES[arch.name] = arch
    return arch


# The numbers below are those of each source's config.json (hidden_size, intermediate_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, rope_theta, rope_scaling,
# max_position_embeddings, rms_norm_eps, tie_word_embeddings, vocab_size); head_dim is
# hidden_size / num_attention_heads in all four. source_params: the public parameter count.
register(
    Architecture(
        name="llama-3.1-8b",
        source="meta-llama/Llama-3.1-8B-Instruct",
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14_336,
        num_layers=32,
        q_heads=32,
        kv_heads=8,
        head_dim=128,
        rope_theta=500_000.0,
        rope_scaling=Llama3Rope(),
        max_position_embeddings=131_072,
        rms_norm_eps=1e-5,
        attention_bias=False,
        tie_word_embeddings=False,
        source_vocab_size=128_256,
        source_params=8.03e9,
    )
)
register(
    Architecture(
        name="llama-3.1-70b",
        source="meta-llama/Llama-3.1-70B-Instruct",
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28_672,
        num_layers=80,
        q_heads=64,
        kv_heads=8,
        head_dim=128,
        rope_theta=500_000.0,
        rope_scaling=Llama3Rope(),
        max_position_embeddings=131_072,
        rms_norm_eps=1e-5,
        attention_bias=False,
        tie_word_embeddings=False,
        source_vocab_size=128_256,
        source_params=70.6e9,
    )
)
register(
    Architecture(
        name="qwen2.5-7b",
        source="Qwen/Qwen2.5-7B-Instruct",
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18_944,
        num_layers=28,
        q_heads=28,
        kv_heads=4,
        head_dim=128,
        rope_theta=1_000_000.0,
        rope_scaling=None,  # config.json has none; the model card's YaRN (factor 4) is opt-in
        max_position_embeddings=32_768,
        rms_norm_eps=1e-6,
        attention_bias=True,
        tie_word_embeddings=False,
        source_vocab_size=152_064,
        source_params=7.62e9,
    )
)
register(
    Architecture(
        name="qwen2.5-32b",
        source="Qwen/Qwen2.5-32B-Instruct",
        model_type="qwen2",
        hidden_size=5120,
        intermediate_size=27_648,
        num_layers=64,
        q_heads=40,
        kv_heads=8,
        head_dim=128,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        max_position_embeddings=32_768,
        rms_norm_eps=1e-6,
        attention_bias=True,
        tie_word_embeddings=False,
        source_vocab_size=152_064,
        source_params=32.8e9,
    )
)
register(
    Architecture(
        name="tiny-llama",
        source="kvlink's own test geometry: GQA 4/2 heads, tied embeddings like SmolLM2",
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        q_heads=4,
        kv_heads=2,
        head_dim=16,
        rope_theta=10_000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        attention_bias=False,
        tie_word_embeddings=True,
        source_vocab_size=49_152,
        source_params=3.2e6,
    )
)
register(
    Architecture(
        name="tiny-qwen2",
        source="kvlink's own test geometry: tiny-llama's shape with Qwen2's q/k/v biases",
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        q_heads=4,
        kv_heads=2,
        head_dim=16,
        rope_theta=1_000_000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        attention_bias=True,
        tie_word_embeddings=False,
        source_vocab_size=49_152,
        source_params=6.4e6,
    )
)


@dataclass(frozen=True)
class RandomModel:
    """A parsed ``random:NAME:layers=N:seed=S``: an architecture, its first `layers` layers, a seed."""

    arch: Architecture
    layers: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.layers <= self.arch.num_layers:
            raise ValueError(
                f"layers must be in 1..{self.arch.num_layers} for {self.arch.name!r}, got {self.layers!r}"
            )
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed!r}")

    @property
    def name(self) -> str:
        """The canonical name, every option spelled out: ``random:llama-3.1-8b:layers=32:seed=0``."""
        return f"{PREFIX}{self.arch.name}:layers={self.layers}:seed={self.seed}"

    @property
    def geometry(self) -> Geometry:
        return self.arch.geometry(self.layers)

    def config(self, tokenizer: Any) -> Any:
        """The transformers config, with the vocabulary size and special ids of `tokenizer`."""
        return self.arch.config(
            len(tokenizer),
            self.layers,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    def definition(self) -> dict[str, Any]:
        """What, with the config and tokenizer, determines every weight (the fingerprint hashes it)."""
        return {
            "random": self.name,
            "init": INIT_SCHEME,
            "init_std": INIT_STD,
            "pool_size": POOL_SIZE,
            "seed": self.seed,
            "layers": self.layers,
        }

    def build(
        self, config: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
    ) -> Any:
        """The model of `config` on `device` in `dtype`, weights filled from the seed (none on "meta")."""
        model = build_empty(config, device, dtype)
        if torch.device(device).type != "meta":
            fill_seeded_(model, self.seed)
        return model.eval()


def is_random(name: str | None) -> bool:
    """Whether `name` asks for a random-weight model (``random:...``)."""
    return name is not None and name.strip().lower().startswith(PREFIX)


def parse(text: str) -> RandomModel:
    """Parse ``random:NAME[:key=value...]`` (keys: layers, seed; case-insensitive names)."""
    if not is_random(text):
        raise ValueError(f"a random model name starts with {PREFIX!r}, got {text!r}")
    name, *options = text.strip()[len(PREFIX) :].split(":")
    arch = ARCHITECTURES.get(name.lower())
    if arch is None:
        raise ValueError(
            f"unknown random architecture {name!r} in {text!r}; registered: {', '.join(sorted(ARCHITECTURES))}"
        )
    values: dict[str, int] = {}
    for option in options:
        key, sep, raw = option.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"option {option!r} in {text!r} is not key=value; options: {', '.join(OPTIONS)}")
        if key not in OPTIONS:
            raise ValueError(f"unknown option {option!r} in {text!r}; options: {', '.join(OPTIONS)}")
        if key in values:
            raise ValueError(f"option {key!r} given twice in {text!r}")
        try:
            values[key] = int(raw.strip())
        except ValueError:
            raise ValueError(f"option {key!r} must be an integer, got {raw!r} in {text!r}") from None
    return RandomModel(arch, values.get("layers", arch.num_layers), values.get("seed", 0))


def build_empty(config: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> Any:
    """The model of `config` allocated on `device` in `dtype`, its weights uninitialized.

    transformers' and torch's initializers are switched off: over 8B parameters on
    CPU they take minutes. Buffers (RoPE frequencies) are computed as usual.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_weights, switched off above, is also what ties them
    return model


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 (numpy wraps uint64 arithmetic, on every platform)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def value_pool(seed: int) -> torch.Tensor:
    """(POOL_SIZE,) float32 values, approximately N(0, INIT_STD^2), a pure function of `seed`.

    Each value is the Irwin-Hall sum of the four 16-bit lanes of one splitmix64
    output (bounded at +-3.46 std); integer arithmetic, then one float64 scale
    and a cast, so every platform gets the same bits.
    """
    index = np.arange(POOL_SIZE, dtype=np.uint64)
    key = _splitmix64(np.array([seed], dtype=np.uint64))  # (1,): decorrelates neighbouring seeds
    mixed = _splitmix64(key + index)
    lanes = [((mixed >> np.uint64(16 * i)) & np.uint64(0xFFFF)).astype(np.int64) for i in range(4)]
    total = (lanes[0] + lanes[1] + lanes[2] + lanes[3]).astype(np.float64)
    mean, std = 2.0 * 65535, (4.0 * (65536.0**2 - 1.0) / 12.0) ** 0.5
    return torch.from_numpy(((total - mean) * (INIT_STD / std)).astype(np.float32))


def pool_offset(seed: int, name: str) -> int:
    """Where parameter `name` starts reading the pool of `seed`."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % POOL_SIZE


@torch.no_grad()
def fill_seeded_(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter in place: matrices from the seed's pool, 1-D weights (norms) 1, biases 0.

    A matrix of n elements is pool[(offset + i) % POOL_SIZE] for i < n, copied
    in windows of POOL_SIZE from a doubled pool already in the parameter's
    dtype and on its device.
    """
    pool = value_pool(seed)
    doubled: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    for name, param in model.named_parameters():  # tied parameters are listed once
        if param.dim() == 1:
            param.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        key = (param.device, param.dtype)
        if key not in doubled:
            doubled[key] = pool.to(device=param.device, dtype=param.dtype).repeat(2)
        source, flat = doubled[key], param.view(-1)  # a fresh parameter is contiguous
        start, done = pool_offset(seed, name), 0
        while done < flat.numel():
            n = min(POOL_SIZE, flat.numel() - done)
            flat[done : done + n].copy_(source[start : start + n])
            done, start = done + n, (start + n) % POOL_SIZE
