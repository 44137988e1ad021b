"""Command-line plumbing shared by kvlink-serve, kvlink-send and kvlink-ask (no model, no torch here).

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)     # true defaults, no "(default: None)"
    p.add_argument("--max-cached-bytes", type=parse_size, default=2 << 30)   # 4GiB, 512MiB, 1_000_000
    args = parse_with_settings(parser, argv, prefix="KVLINK_")            # flag > $KVLINK_* > --config > default
    parser = JsonErrorParser(...)                                          # argparse errors as JSON with --json
    out, err = consoles()                                                  # terminal: live; piped: plain, unwrapped
    configure_logging("warning")                                           # also transformers' bars and messages
    host_port("rx.example:50051", "--server")                              # ValueError without a port

Settings. Every long option of a parser built with `parse_with_settings` can
also come from an environment variable (`--max-cached-bytes` is
`KVLINK_MAX_CACHED_BYTES`) or from a TOML file named by `--config FILE` (or
`$KVLINK_CONFIG`), whose keys are the option names without dashes
(`max-cached-bytes = "4GiB"`, or `max_cached_bytes`). A flag on the command
line wins over the environment, which wins over the file, which wins over the
built-in default. Values from the environment and the file are converted and
checked exactly as the flag's own text would be; booleans take
1/0/true/false/yes/no/on/off; a repeatable flag takes a TOML list or a
comma-separated variable. An unknown key in the file is an error (a typo must
not pass for a setting); unknown KVLINK_* variables are ignored (other tools
use that prefix too: KVLINK_CACHE, KVLINK_KERNELS, KVLINK_AUTH_TOKEN).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from rich.console import Console

CONFIG_FLAG = "--config"

# --- sizes ------------------------------------------------------------------------------------------------------
_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "kb": 1000,
    "m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20, "mb": 1000**2,
    "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "gb": 1000**3,
    "t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40, "tb": 1000**4,
}  # fmt: skip
_SIZE = re.compile(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes from `4GiB`, `512MiB`, `1.5GiB`, `64k`, `1_000_000` or `2GB` (binary units KiB/MiB/GiB/TiB and
    K/M/G/T, decimal kB/MB/GB/TB; case does not matter). Must be a positive whole number of bytes.
    argparse.ArgumentTypeError quotes the text."""
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size like 4GiB, 512MiB or a number of bytes, got {text!r}"
        )
    value = float(match.group(1).replace("_", "")) * _UNITS[unit]
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number of bytes, got {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """`4GiB`, `512MiB`, `1.5GiB`: the exact binary unit when there is one (to 1/4), else bytes."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g}{unit}" if (n * 4) % size == 0 else str(n)
    return str(n)


# --- help ---------------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default when it says something: not None, False, [] or a default the help text
    already states; byte sizes (flags typed parse_size) with their unit."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default is None or default is False or default in ([], "") or default is argparse.SUPPRESS
            or "default" in text or isinstance(action, argparse._StoreConstAction) or action.required
        ):  # fmt: skip
            return text
        shown = (
            format_size(default) if action.type is parse_size and isinstance(default, int) else "%(default)s"
        )
        return f"{text} (default: {shown})"


# --- errors as JSON -------------------------------------------------------------------------------------------------
def json_error(message: str, status: int, code: str = "usage", **extra: Any) -> str:
    """One line of JSON: {"error": {"code", "message", "exit_status", ...}}."""
    return json.dumps({"error": {"code": code, "message": message, "exit_status": status, **extra}})


class JsonErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one JSON object on stdout (exit 2) when the command line asks
    for --json, and argparse's usage line + message on stderr otherwise."""

    json_errors = False

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        self.json_errors = "--json" in argv
        return super().parse_args(argv, namespace)

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            print(json_error(f"{self.prog}: {message}", 2))
            sys.exit(2)
        super().error(message)


# --- settings from the environment and a config file ---------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_name(option: str, prefix: str = "KVLINK_") -> str:
    """`--max-cached-bytes` -> `KVLINK_MAX_CACHED_BYTES`."""
    return prefix + option.lstrip("-").replace("-", "_").upper()


def _settable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name without dashes -> action, for every option but --help and --config."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if longs[0] == CONFIG_FLAG:
            continue
        found[longs[0][2:]] = action
    return found


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, where: str) -> Any:
    """A value from the environment or the file, converted and checked as the flag's own text would be."""

    def one(item: Any) -> Any:
        if isinstance(item, bool):
            item = "true" if item else "false"
        text = str(item)
        try:
            converted = action.type(text) if callable(action.type) else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            parser.error(f"{where}: {exc}")
        if action.choices is not None and converted not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            parser.error(f"{where}: invalid choice {converted!r} (choose from {choices})")
        return converted

    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        text = str(value).strip().lower() if not isinstance(value, bool) else ("true" if value else "false")
        if text not in _TRUE | _FALSE:
            parser.error(f"{where}: expected true or false, got {value!r}")
        on = text in _TRUE
        return on if isinstance(action, argparse._StoreTrueAction) else not on
    if isinstance(action, argparse.BooleanOptionalAction):
        text = str(value).strip().lower() if not isinstance(value, bool) else ("true" if value else "false")
        if text not in _TRUE | _FALSE:
            parser.error(f"{where}: expected true or false, got {value!r}")
        return text in _TRUE
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
        return [one(v.strip() if isinstance(v, str) else v) for v in items]
    if isinstance(value, list):
        parser.error(f"{where}: expected one value, got a list")
    return one(value)


def read_config(path: str) -> dict[str, Any]:
    """The TOML file's table (ValueError naming the file when it cannot be read or parsed)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError(f"{CONFIG_FLAG} needs Python 3.11 or newer (tomllib)") from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ValueError(f"cannot read {CONFIG_FLAG} {path!r}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{CONFIG_FLAG} {path!r} is not valid TOML: {exc}") from None


def parse_with_settings(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    *,
    prefix: str = "KVLINK_",
    environ: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """Parse `argv` with defaults taken from `prefix`* variables and the --config file (see the module
    docstring); the parser must have a --config option. Errors exit 2 through parser.error."""
    environ = os.environ if environ is None else environ
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(CONFIG_FLAG, default=environ.get(env_name(CONFIG_FLAG, prefix)))
    known, _ = pre.parse_known_args(argv)
    actions = _settable(parser)
    defaults: dict[str, Any] = {}
    if known.config:
        try:
            table = read_config(known.config)
        except ValueError as exc:
            parser.error(str(exc))
        for key, value in table.items():
            name = str(key).replace("_", "-")
            if name not in actions:
                listed = ", ".join(sorted(actions))
                parser.error(
                    f"{CONFIG_FLAG} {known.config!r}: unknown setting {key!r}; the settings are: {listed}"
                )
            action = actions[name]
            defaults[action.dest] = _convert(parser, action, value, f"{CONFIG_FLAG} {known.config!r}: {key}")
    for name, action in actions.items():
        variable = env_name(name, prefix)
        if variable in environ:
            defaults[action.dest] = _convert(parser, action, environ[variable], f"${variable}")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


# --- output ---------------------------------------------------------------------------------------------------------
WIDE = 10_000
"""Console width when the output is not a terminal: lines are never wrapped or cut."""


def console(stderr: bool = False) -> Console:
    """A rich Console: on a terminal as wide as it is, with colors; piped or redirected, plain text
    (no colors, no animation) in complete lines, never wrapped or cut to 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=WIDE, no_color=True, highlight=False, soft_wrap=True)


def consoles() -> tuple[Console, Console]:
    """(stdout, stderr) consoles, see `console`."""
    return console(False), console(True)


def configure_logging(level: str, fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """Log at `level` (debug, info, warning, error) to stderr, transformers and huggingface_hub included:
    their progress bars ("Loading weights") show only at info or debug, on a terminal."""
    numeric = getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format=fmt, stream=sys.stderr)
    logging.getLogger().setLevel(numeric)  # (basicConfig leaves a configured root logger as it is)
    bars = numeric <= logging.INFO and sys.stderr.isatty()
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if bars else "1"
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.set_verbosity(max(numeric, logging.WARNING))  # transformers' info level is a flood
    if bars:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


# --- addresses ------------------------------------------------------------------------------------------------------
def host_port(target: str, flag: str = "--server") -> str:
    """`target` if it is HOST:PORT ([v6]:PORT too) or a gRPC URI (unix:, dns:, ipv4:, ipv6:); ValueError
    saying what is missing otherwise (a bare host would make gRPC dial port 443)."""
    text = target.strip()
    if re.match(r"^(unix|unix-abstract|dns|ipv4|ipv6|vsock):", text):
        return text
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", text)
        host, port = (match.group(1), match.group(2)) if match else ("", None)
        example = f"[{host or '::1'}]:50051"
    elif text.count(":") > 1:  # a bare IPv6 address: its last group is not a port
        host, port, example = text, None, f"[{text}]:50051"
    else:
        host, _, port = text.partition(":") if ":" in text else (text, "", None)
        example = f"{host or 'HOST'}:50051"
    if not host:
        raise ValueError(f"{flag} {target!r} has no host: give HOST:PORT, e.g. 127.0.0.1{text}")
    if port is None:
        raise ValueError(f"{flag} {target!r} has no port: give HOST:PORT, e.g. {example}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} {target!r}: the port must be a number in 1..65535, got {port!r}")
    return text
