"""Every quantization format kvlink knows, one `FormatSpec` each; every table of formats derives from here.

    spec = format_spec("int4cw")     # FormatSpec(name='int4cw', bits=4, family='int', widths='channel', ...)
    registered_format_specs()        # all of them, by name

A format is what one tensor's codes mean: its bits per code (the mean, for the
formats with a width per channel or per row), whether groups carry a float16
scale and zero, which axis its widths run along (None: one width for the whole
tensor), and whether a Triton dequantize kernel exists for it (kvlink.kernels
dispatches on this and refuses a format it has no kernel for). Names travel on
the wire and in config names:

| name | codes | groups carry | widths |
| --- | --- | --- | --- |
| fp16 | the float16 values | nothing | - |
| int8, int4, int3, int2 | unsigned INT codes | scale, zero | - |
| nf4 | indices of the 16 NF4 levels | scale (absmax) | - |
| int4cw, int3cw, int2cw | INT codes of a width per channel (mean 4/3/2) | scale, zero | per channel (keys) |
| int4rw, int3rw, int2rw | INT codes of a width per token row (mean 4/3/2) | scale, zero | per row (values) |

The byte layouts are in kvlink.quant.base (uniform formats) and kvlink.quant.widths.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlink.errors import NotRegistered


@dataclass(frozen=True)
class FormatSpec:
    """One quantization format. bits: per code (the mean under `widths`); family: "fp", "int" or "nf";
    widths: None, "channel" or "token" (the axis a width per line runs along); kernel: a Triton
    dequantize kernel exists (kvlink.kernels)."""

    name: str
    bits: int
    family: str
    widths: str | None = None
    kernel: bool = True

    @property
    def has_scale(self) -> bool:
        return self.family != "fp"

    @property
    def has_zero(self) -> bool:
        return self.family == "int"

    @property
    def uniform(self) -> str:
        """The format of the same codes without widths (int4cw -> int4; itself otherwise)."""
        return f"int{self.bits}" if self.widths else self.name

    def with_widths(self, axis: str) -> str | None:
        """The format with a width per line along `axis` ("channel" or "token") of this one's bits, if
        one exists (INT2/3/4 only), else None."""
        if self.family != "int" or self.widths or self.bits not in WIDTHS_MEANS:
            return None
        return f"int{self.bits}{'cw' if axis == 'channel' else 'rw'}"


WIDTHS_MEANS: tuple[int, ...] = (4, 3, 2)
"""The INT widths that have width-per-line formats."""

INT_WIDTHS: tuple[int, ...] = (8, 4, 3, 2)
"""The uniform INT widths (what a per-layer allocation gives each tensor)."""

_SPECS: dict[str, FormatSpec] = {}


def register_format(spec: FormatSpec) -> FormatSpec:
    """Add a format; a duplicate name raises."""
    if spec.name in _SPECS:
        raise ValueError(f"format {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def format_spec(name: str) -> FormatSpec:
    """The FormatSpec of `name`; an unknown name lists the registered ones."""
    try:
        return _SPECS[name]
    except KeyError:
        raise NotRegistered(f"unknown quantization format {name!r}; registered: {sorted(_SPECS)}") from None


def registered_format_specs() -> dict[str, FormatSpec]:
    return dict(_SPECS)


register_format(FormatSpec("fp16", 16, "fp"))
for _bits in INT_WIDTHS:
    register_format(FormatSpec(f"int{_bits}", _bits, "int"))
register_format(FormatSpec("nf4", 4, "nf"))
for _bits in WIDTHS_MEANS:
    register_format(FormatSpec(f"int{_bits}cw", _bits, "int", widths="channel"))
for _bits in WIDTHS_MEANS:
    register_format(FormatSpec(f"int{_bits}rw", _bits, "int", widths="token"))
