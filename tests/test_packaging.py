"""Packaging: the core library needs none of the extras' packages; pyproject's extras name them; the
Makefile and the images install the extras they run; the wheel carries the package data (the
dashboard's files, the data tables).

The core (the library, kvlink-send, kvlink-ask) installs with `pip install kvlink`; `kvlink[serve]` adds
the receiver's REST side (FastAPI, uvicorn, Swagger assets, Prometheus); `kvlink[bench]` adds kvlink-bench's
plots and REST reads (and serve: its load, scale and abuse benchmarks start a receiver).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

SERVE_ONLY = {"fastapi": "fastapi", "uvicorn": "uvicorn", "fastapi_offline": "fastapi-offline",
              "prometheus_client": "prometheus-client"}  # fmt: skip
"""Module -> distribution of what only kvlink[serve] installs."""
BENCH_ONLY = {"matplotlib": "matplotlib"}
"""Module -> distribution of what only kvlink[bench] installs."""
CORE_MODULES = (
    "kvlink.codec", "kvlink.recipe", "kvlink.wire", "kvlink.budget", "kvlink.cache", "kvlink.answer",
    "kvlink.kernels",
)  # fmt: skip
OPTIONAL = {"triton", "grpc_tools"}
"""Imported by the core only behind a guard: Triton (kvlink.kernels.HAS_TRITON), grpcio-tools (stub
generation, kvlink._proto.build, a build requirement)."""


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string ('fastapi-offline>=1.7' -> 'fastapi-offline')."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match[0]).lower()


def _names(requirements: list[str]) -> set[str]:
    return {_name(r) for r in requirements}


@cache
def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())  # type: ignore[no-any-return]


def _core() -> list[str]:
    return list(_pyproject()["project"]["dependencies"])


def _extra(name: str) -> list[str]:
    return list(_pyproject()["project"]["optional-dependencies"][name])


# --- the core imports and round-trips a message with the extras refused -------------------------------
CORE_SCRIPT = """
import importlib
import importlib.abc
import sys

REFUSED = frozenset(sys.argv[1].split(","))


class Refuse(importlib.abc.MetaPathFinder):
    '''Refuses the extras' packages, installed or not: an import of one fails as if it were absent.'''

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"No module named {name!r} (refused: not a core dependency)", name=name)
        return None


sys.meta_path.insert(0, Refuse())
for module in sys.argv[2].split(","):
    importlib.import_module(module)

import torch
from conftest import ToyTokenizer, random_ids, tiny_model

from kvlink import wire
from kvlink.answer import GenerationOptions, generate_answer
from kvlink.cache import prefill
from kvlink.codec import Codec
from kvlink.models import wrap
from kvlink.recipe import Recipe

lm = wrap(tiny_model("llama"), ToyTokenizer(), name="tiny-llama")
ctx, question = random_ids(40, seed=1), random_ids(6, seed=2)
recipe = Recipe.from_name("q2c50%+kint4c/vint3t-g16+sink1+round-query+kwidths-question+zstd3")
encoded = Codec(recipe, lm.geometry).encode(prefill(lm.model, ctx, question, observe=recipe.needs()))
frames = wire.to_frames(encoded, "session-1", "message-1", lm.fingerprint, 256)
receiver = wire.Assembler(lm.fingerprint, lm.geometry)
for frame in frames:
    receiver.feed_raw(wire.frame_bytes(frame))
received, receipt = receiver.finish()
sent, decoded = Codec(recipe, lm.geometry).decode(encoded), Codec(recipe, lm.geometry).decode(received)
assert all(torch.equal(a, b) for a, b in zip(sent.keys + sent.values, decoded.keys + decoded.values))
answer = generate_answer(lm.model, lm.tokenizer, decoded, question, GenerationOptions(max_new_tokens=3))
assert len(answer.token_ids) >= 1, answer
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in REFUSED)
assert not leaked, leaked
print(f"frames={len(frames)} chunks={receipt.chunks} answer={answer.token_ids}")
"""


def test_the_core_imports_and_round_trips_a_message_without_the_extras(tmp_path: Path) -> None:
    refused = sorted({*SERVE_ONLY, *BENCH_ONLY})
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CORE_SCRIPT), ",".join(refused), ",".join(CORE_MODULES)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
             "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.startswith("frames="), out.stdout


def test_the_refusing_finder_refuses() -> None:
    """The finder of the script above does stop an import of a refused package (one that is installed)."""
    script = CORE_SCRIPT.split("sys.meta_path.insert(0, Refuse())")[0] + (
        "sys.meta_path.insert(0, Refuse())\n"
        "try:\n    import fastapi\nexcept ModuleNotFoundError as exc:\n    print('refused', exc.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script), "fastapi", ""],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "refused fastapi"


# --- pyproject, Makefile, images ---------------------------------------------------------------------
def test_the_extras_hold_what_the_core_does_not_need() -> None:
    core = _names(_core())
    serve, bench = _names(_extra("serve")), _names(_extra("bench"))
    assert not core & {*SERVE_ONLY.values(), *BENCH_ONLY.values()}, core
    assert set(SERVE_ONLY.values()) <= serve, serve
    assert set(BENCH_ONLY.values()) <= bench, bench
    assert "kvlink[serve]" in [r.replace(" ", "") for r in _extra("bench")], (
        "kvlink-bench load/scale/abuse start a receiver"
    )
    assert {"grpcio", "grpcio-health-checking", "protobuf", "torch", "transformers"} <= core, (
        "the sender needs them"
    )


def test_the_makefile_installs_every_extra_the_tests_use() -> None:
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r"\$\(PIP\) install -q -e '\.\[([^\]]*)\]'", makefile)
    assert installs, "the Makefile installs the project with its extras"
    assert {"dev", "serve", "bench"} <= set(installs[0].split(",")), installs
    torch_at, project_at = makefile.index("install -q torch=="), makefile.index("install -q -e '.[")
    assert torch_at < project_at, "torch is installed first"


def test_the_makefile_installs_the_programs_the_tests_start() -> None:
    """`make test` runs every test from nothing: Redis for the fleet tests, chromium for the browser tests."""
    makefile = (ROOT / "Makefile").read_text()
    prerequisites = re.search(r"^pytest:([^\n]*)$", makefile, re.M)
    assert prerequisites is not None, "no pytest target"
    assert {"install", "redis-server", "chromium"} <= set(prerequisites[1].split()), prerequisites[0]
    assert re.search(r"^chromium:\n(\t[^\n]*\n)*\t[^\n]*apt-get install [^\n]*\bchromium\b", makefile, re.M)
    assert re.search(r"^test-browser: install chromium\n\t[^\n]*pytest [^\n]*-m browser", makefile, re.M)


def test_the_images_install_the_serve_extras() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (ROOT / "deploy" / name).read_text()
        assert re.search(r"pip install \"?/src\[serve\]\"?", text), (
            f"{name} must install /src[serve] for kvlink-serve"
        )


# --- what each side imports is what its dependencies install -----------------------------------------
def _third_party_imports(paths: list[Path]) -> dict[str, str]:
    """Top-level module -> a file importing it (module-level or inside functions), stdlib and first-party left out."""
    found: dict[str, str] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in ("kvlink", "__future__"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _closure(requirements: list[str]) -> set[str]:
    """The distributions the requirements install (installed ones, recursively; optional extras not followed)."""
    todo, seen = [_name(r) for r in requirements if not r.startswith("kvlink[")], set()
    for r in requirements:
        if r.startswith("kvlink["):
            todo += [_name(x) for extra in r[7:-1].split(",") for x in _extra(extra)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def _distribution(module: str) -> str:
    dists = importlib.metadata.packages_distributions().get(module)
    assert dists, f"no installed distribution provides {module!r}"
    return _name(dists[0])


def _check(paths: list[Path], requirements: list[str], optional: set[str]) -> None:
    allowed = _closure(requirements)
    missing = {
        module: where
        for module, where in _third_party_imports(paths).items()
        if module not in optional and _distribution(module) not in allowed
    }
    assert not missing, f"imported but not installed by {requirements}: {missing}"


def test_the_core_imports_only_core_dependencies() -> None:
    paths = [p for p in (ROOT / "kvlink").rglob("*.py") if not {"eval", "server"} & set(p.parts)]
    paths = [p for p in paths if "_pb2" not in p.name and p.name != "demo.py"]
    _check(paths, _core(), OPTIONAL)


def test_the_receiver_imports_only_core_and_serve_dependencies() -> None:
    # kvlink/server/local.py is not the receiver: it starts one (kvlink-serve in a subprocess) for the demo,
    # kvlink-bench and the tests, and reads its /healthz with httpx (kvlink[bench]).
    paths = [p for p in (ROOT / "kvlink" / "server").glob("*.py") if p.name != "local.py"]
    _check(paths, [*_core(), *_extra("serve")], OPTIONAL)


def test_kvlink_bench_and_the_demo_import_only_core_and_bench_dependencies() -> None:
    paths = [
        *(ROOT / "kvlink" / "eval").glob("*.py"),
        ROOT / "kvlink" / "demo.py",
        ROOT / "kvlink" / "server" / "local.py",
    ]
    _check(paths, [*_core(), *_extra("bench")], OPTIONAL)


# --- the wheel carries the package data ---------------------------------------------------------------------
def test_the_wheel_ships_the_dashboard_and_the_data(tmp_path: Path) -> None:
    """A wheel built from the sources pyproject names holds the dashboard's page, script, style and icon
    (kvlink-serve serves them at /) and the data files, as a `pip install` from it would put them."""
    pytest.importorskip("setuptools")
    import shutil
    import zipfile

    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*_pb2*")
    shutil.copytree(ROOT / "kvlink", src / "kvlink", ignore=skip)
    shutil.copytree(ROOT / "proto", src / "proto", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("kvlink-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = ROOT / "kvlink" / "server" / "static"
    assets = {f"kvlink/server/static/{p.name}" for p in static.iterdir()}
    assert {"kvlink/server/static/index.html", "kvlink/server/static/dashboard.js"} <= assets
    assert assets <= names, sorted(assets - names)
    data = {str(p.relative_to(ROOT)) for p in (ROOT / "kvlink" / "data").rglob("*.json")}
    assert data and data <= names, sorted(data - names)
