"""Generate the Python stubs of proto/kvlink/v2/kvlink.proto into this package.

Run by `make proto` (and on demand by `kvlink.wire` when the stubs are missing
in a source checkout). The stubs are never committed and never edited by hand.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent.parent / "proto"
PROTO_FILE = PROTO_ROOT / "kvlink" / "v2" / "kvlink.proto"


def generate(out_dir: Path = PACKAGE_DIR, proto_file: Path = PROTO_FILE) -> list[Path]:
    """Run grpc_tools.protoc on the proto and make the imports package-relative."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kvlink's protobuf stubs are missing and grpcio-tools is not installed: "
            "run `make proto` or `pip install grpcio-tools` and retry"
        ) from exc
    if not proto_file.is_file():
        raise FileNotFoundError(f"proto file not found: {proto_file}")
    import grpc_tools

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_file.parent}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto_file),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} on {proto_file}")
    stem = proto_file.stem
    grpc_file = out_dir / f"{stem}_pb2_grpc.py"
    # protoc writes `import kvlink_pb2`; inside a package it must be relative.
    text = grpc_file.read_text()
    text = re.sub(rf"^import {stem}_pb2 as", f"from . import {stem}_pb2 as", text, flags=re.M)
    grpc_file.write_text(text)
    written = [out_dir / f"{stem}_pb2.py", out_dir / f"{stem}_pb2.pyi", grpc_file]
    logger.info("generated %s", ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    for path in generate():
        print(path)
    sys.exit(0)
