"""Quantizer attribute configs: ModelOpt's ``QuantizerAttributeConfig`` as a frozen dataclass.

A ``QuantizerConfig`` says *how* one tensor is quantized (its format); it carries no state. The
recipe matcher resolves one config (or ``None`` = disabled) per quantizer name, and a
``TensorQuantizer`` holds it as static metadata next to its calibrated ``amax``.

Field names, defaults and spellings follow ModelOpt (spec modelopt.md §1.3). Every field is
hashable (ints, strings, tuples, frozen dataclasses; never dicts or lists) because NNX keeps the
config as static metadata. ``QuantizerConfig.from_dict`` parses and validates ModelOpt's dict
spelling (``num_bits: e4m3``, ``block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3}``);
``to_dict`` writes it back.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from jaxquant.errors import RecipeError
from jaxquant.formats.registry import QUANTIZER_FORMATS

NumBits = int | tuple[int, int]

E4M3 = (4, 3)
E2M1 = (2, 1)
E8M0 = (8, 0)

# The (E, M) pairs ModelOpt accepts for ``num_bits`` (QuantizerAttributeConfig.validate_num_bits).
_FP_NUM_BITS = ((4, 3), (5, 2), (2, 1), (1, 2), (0, 3), (3, 0), (3, 2), (2, 3))
_EXMY_RE = re.compile(r"^[Ee](\d+)[Mm](\d+)$")
_BLOCK_STR_KEYS = ("type", "scale_bits", "scale_block_sizes", "four_over_six")
_ROTATE_DEFAULTS = {"mode": "rotate", "rotate_fp32": False, "block_size": None}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """ModelOpt ``block_sizes``: block quantization along one (rarely two) axes.

    Attributes:
      size: elements per block along ``axis`` (16 for NVFP4), or None for "whole axis"
        (per-token dynamic).
      axis: the blocked axis; ModelOpt's dynamic blocks support only the last axis (-1).
      type: "dynamic" (per-block scales recomputed every call; only the global amax is calibrated)
        or "static" (per-block amax calibrated and stored).
      scale_bits: format of the per-block scales, (4, 3) for NVFP4's e4m3 scales, (8, 0) for MX.
      other_axes: further ``(axis, size)`` pairs for multi-axis (2D) blocks, e.g. ``((-2, 128),)``.
      scale_block_sizes: ModelOpt's double-quantization block sizes, as sorted ``(axis, size)``
        pairs, or None.
      four_over_six: ModelOpt's Four-over-Six adaptive NVFP4 scaling.
    """

    size: int | None
    axis: int = -1
    type: Literal["static", "dynamic"] = "static"
    scale_bits: NumBits | None = None
    other_axes: tuple[tuple[int, int | None], ...] = ()
    scale_block_sizes: tuple[tuple[int, int | None], ...] | None = None
    four_over_six: bool = False

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "block_sizes") -> BlockSizes:
        """Parse ModelOpt's ``block_sizes`` mapping (``{-1: 16, type: dynamic, scale_bits: e4m3}``).

        Integer keys are axes (JSON's ``"-1"`` is accepted too); the string keys are ``type``,
        ``scale_bits``, ``scale_block_sizes`` and ``four_over_six``.

        Raises:
          RecipeError: naming ``where`` and the offending key.
        """
        if not isinstance(d, Mapping):
            raise RecipeError(f"{_loc(where)}: must be a mapping like {{-1: 16, type: dynamic}}, got {d!r}")
        axes: list[tuple[int, int | None]] = []
        kw: dict[str, Any] = {}
        for k, v in d.items():
            axis = _as_axis_key(k)
            if axis is not None:
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                    raise RecipeError(
                        f"{_sub(where, k)}: block size must be a positive integer or null, got {v!r}"
                    )
                axes.append((axis, v))
            elif k == "type":
                if v not in ("static", "dynamic"):
                    raise RecipeError(f"{_sub(where, 'type')}: must be 'static' or 'dynamic', got {v!r}")
                kw["type"] = v
            elif k == "scale_bits":
                kw["scale_bits"] = parse_num_bits(v, f"{_sub(where, 'scale_bits')}")
            elif k == "scale_block_sizes":
                if v is None:
                    continue
                if not isinstance(v, Mapping):
                    raise RecipeError(f"{_sub(where, 'scale_block_sizes')}: must be a mapping, got {v!r}")
                pairs = []
                for sk, sv in v.items():
                    sa = _as_axis_key(sk)
                    if sa is None or (sv is not None and (isinstance(sv, bool) or not isinstance(sv, int))):
                        raise RecipeError(f"{_sub(where, 'scale_block_sizes')}.{sk}: bad entry {sv!r}")
                    pairs.append((sa, sv))
                kw["scale_block_sizes"] = tuple(sorted(pairs))
            elif k == "four_over_six":
                # ModelOpt's validated configs hold it as 1 / 0 (its block_sizes value type tries int before bool)
                if not isinstance(v, bool) and v not in (0, 1):
                    raise RecipeError(f"{_sub(where, 'four_over_six')}: must be true or false, got {v!r}")
                kw["four_over_six"] = bool(v)
            else:
                raise RecipeError(
                    f"{_sub(where, k)}: unknown block_sizes key; expected integer axes or one of "
                    f"{', '.join(_BLOCK_STR_KEYS)}"
                )
        if not axes:
            raise RecipeError(f"{_loc(where)}: no blocked axis given (e.g. -1: 16)")
        if kw.get("type") == "dynamic" and len(axes) != 1:
            raise RecipeError(
                f"{_loc(where)}: dynamic block quantization supports exactly one axis (the last), "
                f"got {[a for a, _ in axes]}"
            )
        # The primary axis is the last one (-1) when present, else the first listed.
        axes.sort(key=lambda p: (p[0] != -1,))
        (axis, size), rest = axes[0], tuple(axes[1:])
        return cls(size=size, axis=axis, other_axes=rest, **kw)

    def to_dict(self, *, exmy: bool = False) -> dict:
        """ModelOpt's mapping spelling; ``exmy=True`` writes ``scale_bits`` as ``"e4m3"``."""
        d: dict[Any, Any] = {self.axis: self.size}
        for a, s in self.other_axes:
            d[a] = s
        d["type"] = self.type
        if self.scale_bits is not None:
            d["scale_bits"] = format_num_bits(self.scale_bits) if exmy else self.scale_bits
        if self.scale_block_sizes is not None:
            d["scale_block_sizes"] = dict(self.scale_block_sizes)
        if self.four_over_six:
            d["four_over_six"] = True
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizerConfig:
    """One quantizer's attributes (ModelOpt ``QuantizerAttributeConfig``).

    Attributes mirror ModelOpt's defaults: an enabled quantizer that no ``cfg`` ever touched is
    INT8 per-tensor (num_bits=8, axis=None). ``bias``, ``rotate`` and ``backend_extra_args`` are
    kept in a hashable form (sorted ``(key, value)`` tuples) when they are mappings.
    """

    enable: bool = True
    num_bits: NumBits | str = 8
    axis: int | tuple[int, ...] | None = None
    block_sizes: BlockSizes | None = None
    fake_quant: bool = True
    unsigned: bool = False
    narrow_range: bool = False
    type: Literal["static", "dynamic"] = "static"
    calibrator: str = "max"
    pass_through_bwd: bool = True
    use_constant_amax: bool = False
    constant_amax: float | None = None
    # AutoQuantize's cost per element; no effect on the numerics, so it is left out of ==/hash.
    effective_bits: float | None = dataclasses.field(default=None, compare=False)
    # Accepted for schema compatibility; jaxquant does not implement them (yet): a config that
    # sets them reports an ``unsupported_reason``.
    bias: Any = None
    rotate: Any = False
    trt_high_precision_dtype: str = "Float"
    backend: str | None = None
    backend_extra_args: Any = None

    # ----------------------------------------------------------------- parsing / writing
    @classmethod
    def from_dict(cls, d: Mapping, where: str = "cfg") -> QuantizerConfig:
        """Parse and validate a ModelOpt ``QuantizerAttributeConfig`` mapping.

        Accepts ModelOpt's spellings: ``num_bits`` as an int, ``e4m3`` / ``E2M1`` strings or an
        ``[E, M]`` pair; ``axis`` as null / int / list; ``block_sizes`` as a mapping; JSON-style
        string axis keys (``"-1"``). Validation follows ModelOpt's pydantic model (allowed
        ``num_bits`` pairs, ``axis`` xor ``block_sizes``, one axis for dynamic blocks, exclusive
        constant-amax modes, a cfg that is only ``{enable: true}`` is rejected).

        Args:
          d: the mapping.
          where: location used in error messages, e.g. ``"recipe.yaml: quantize.quant_cfg[3].cfg"``.

        Raises:
          RecipeError: naming ``where`` and the key path of the problem.
        """
        if isinstance(d, QuantizerConfig):
            return d
        if not isinstance(d, Mapping):
            raise RecipeError(f"{_loc(where)}: a quantizer config must be a mapping, got {d!r}")
        unknown = [k for k in d if k not in _FIELD_NAMES and k != "learn_amax"]
        if unknown:
            raise RecipeError(
                f"{_sub(where, unknown[0])}: unknown quantizer attribute; known: {', '.join(_FIELD_NAMES)}"
            )
        if len(d) == 1 and d.get("enable") is True:
            raise RecipeError(
                f"{_loc(where)}: a cfg of only {{enable: true}} is not allowed (ModelOpt rejects it); give "
                "the format (num_bits, axis / block_sizes) or drop cfg and use enable alone"
            )
        if d.get("learn_amax", False) is not False:
            raise RecipeError(f"{_sub(where, 'learn_amax')}: deprecated; only false is accepted")
        kw: dict[str, Any] = {}
        for key in ("enable", "fake_quant", "unsigned", "narrow_range", "pass_through_bwd",
                    "use_constant_amax"):
            if key in d:
                if not isinstance(d[key], bool):
                    raise RecipeError(f"{_sub(where, key)}: must be true or false, got {d[key]!r}")
                kw[key] = d[key]
        backend = d.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise RecipeError(f"{_sub(where, 'backend')}: must be a string or null, got {backend!r}")
        kw["backend"] = backend
        if "num_bits" in d:
            kw["num_bits"] = parse_num_bits(d["num_bits"], f"{_sub(where, 'num_bits')}",
                                            allow_str=backend is not None)
        if "axis" in d:
            kw["axis"] = _parse_axis(d["axis"], f"{_sub(where, 'axis')}")
        if d.get("block_sizes") is not None:
            if kw.get("axis") is not None:
                raise RecipeError(
                    f"{_sub(where, 'block_sizes')}: cannot be combined with axis={kw['axis']!r}; "
                    "use axis: null (or omit axis) with block_sizes"
                )
            kw["block_sizes"] = BlockSizes.from_dict(d["block_sizes"], f"{_sub(where, 'block_sizes')}")
        if "type" in d:
            if d["type"] not in ("static", "dynamic"):
                raise RecipeError(f"{_sub(where, 'type')}: must be 'static' or 'dynamic', got {d['type']!r}")
            kw["type"] = d["type"]
        if "calibrator" in d:
            if d["calibrator"] not in ("max", "histogram"):
                raise RecipeError(
                    f"{_sub(where, 'calibrator')}: must be 'max' or 'histogram', got {d['calibrator']!r}"
                )
            kw["calibrator"] = d["calibrator"]
        if "trt_high_precision_dtype" in d:
            if d["trt_high_precision_dtype"] not in ("Float", "Half", "BFloat16"):
                raise RecipeError(
                    f"{_sub(where, 'trt_high_precision_dtype')}: must be Float, Half or BFloat16, "
                    f"got {d['trt_high_precision_dtype']!r}"
                )
            kw["trt_high_precision_dtype"] = d["trt_high_precision_dtype"]
        for key in ("constant_amax", "effective_bits"):
            v = d.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RecipeError(f"{_sub(where, key)}: must be a number, got {v!r}")
            kw[key] = float(v)
        if kw.get("constant_amax") is not None and kw["constant_amax"] <= 0:
            raise RecipeError(f"{_sub(where, 'constant_amax')}: must be positive, got {kw['constant_amax']}")
        if kw.get("effective_bits") is not None and not 0 < kw["effective_bits"] <= 16:
            raise RecipeError(f"{_sub(where, 'effective_bits')}: must be in (0, 16], got {kw['effective_bits']}")
        if kw.get("use_constant_amax") and kw.get("constant_amax") is not None:
            raise RecipeError(
                f"{_loc(where)}: use_constant_amax and constant_amax are mutually exclusive"
            )
        if d.get("bias") is not None:
            bias = d["bias"]
            if not isinstance(bias, Mapping):
                raise RecipeError(f"{_sub(where, 'bias')}: must be a mapping, got {bias!r}")
            kw["bias"] = _freeze(bias)
        if "rotate" in d and d["rotate"] is not None:
            rot = d["rotate"]
            if not isinstance(rot, (bool, Mapping)):
                raise RecipeError(f"{_sub(where, 'rotate')}: must be true/false or a mapping, got {rot!r}")
            if isinstance(rot, Mapping):  # ModelOpt RotateConfig; canonicalize the plain cases
                extra = {k: v for k, v in rot.items() if k != "enable"}
                if not rot.get("enable", False):
                    rot = False
                elif set(extra) <= set(_ROTATE_DEFAULTS) and all(
                    extra.get(k, dv) == dv for k, dv in _ROTATE_DEFAULTS.items()
                ):
                    rot = True
            kw["rotate"] = _freeze(rot)
        if d.get("backend_extra_args") is not None:
            kw["backend_extra_args"] = _freeze(d["backend_extra_args"])
        cfg = cls(**kw)
        cfg._check_num_bits(where)
        return cfg

    def _check_num_bits(self, where: str):
        nb = self.num_bits
        if self.backend is not None or not isinstance(nb, tuple):
            return
        if nb not in (E4M3, E2M1) and (self.block_sizes is None or self.block_sizes.type != "dynamic"):
            raise RecipeError(
                f"{_sub(where, 'num_bits')}: e{nb[0]}m{nb[1]} is only valid with dynamic block quantization "
                "(block_sizes with type: dynamic)"
            )

    def to_dict(self, *, exmy: bool = False, full: bool = False) -> dict:
        """ModelOpt's dict spelling of this config (the inverse of ``from_dict``).

        Args:
          exmy: write ``num_bits`` / ``scale_bits`` pairs as ``"e4m3"`` strings (YAML/JSON
            friendly) instead of ``(4, 3)`` tuples (ModelOpt's resolved form).
          full: write every field; by default only ``num_bits``, the granularity (``axis`` or
            ``block_sizes``) and the fields that differ from ModelOpt's defaults.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            always = f.name == "num_bits" or (f.name == "axis" and self.block_sizes is None)
            if not (full or always or v != f.default):
                continue
            if f.name == "enable" and not full and v:
                continue
            if f.name == "num_bits":
                v = format_num_bits(v) if exmy else v
            elif f.name == "block_sizes" and v is not None:
                v = v.to_dict(exmy=exmy)
            elif f.name == "axis" and isinstance(v, tuple):
                v = list(v) if exmy else v
            elif f.name in ("bias", "rotate", "backend_extra_args"):
                v = _thaw(v)
            out[f.name] = v
        return out

    def replace(self, **changes) -> QuantizerConfig:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- derived properties
    @property
    def format(self) -> str:
        """Short format name: 'fp8', 'fp8_per_channel', 'nvfp4', 'nvfp4_static', or a descriptive
        name of a format jaxquant does not implement (e.g. 'int8', 'mxfp4', 'int4_block128',
        'fp8_per_token', 'fp8_affine'). A Hadamard rotation (``rotate``) is not part of the format: it transforms the
        input first (``rotation``)."""
        base = self._base_format()
        if self.bias is not None:
            base += "_affine"
        return base

    @property
    def rotation(self) -> tuple[int | None, bool] | None:
        """``(block_size, rotate_fp32)`` of the normalized Hadamard rotation ModelOpt applies to this quantizer's
        input (also when the quantizer is disabled: ``kv_nvfp4_rotate``'s query quantizer), None without one."""
        r = self.rotate
        if r in (False, None) or not _truthy_rotate(r):
            return None
        if r is True:
            return (None, False)
        d = dict(r)
        return (d.get("block_size"), bool(d.get("rotate_fp32", False)))

    @property
    def rotation_unsupported_reason(self) -> str | None:
        """Why jaxquant cannot apply this config's ``rotate`` (None when it can, or there is none)."""
        if self.rotation is None or self.rotate is True:
            return None
        d = dict(self.rotate)
        if d.get("mode", "rotate") != "rotate":
            return f"rotate mode {d['mode']!r} (jaxquant rotates the input only: mode 'rotate')"
        extra = set(d) - {"enable", *_ROTATE_DEFAULTS}
        return f"rotate options {sorted(extra)}" if extra else None

    def _base_format(self) -> str:
        nb, bs = self.num_bits, self.block_sizes
        if self.backend is not None:
            return f"backend_{self.backend}"
        if isinstance(nb, str):
            return nb
        dyn = self.type == "dynamic"
        if nb == E4M3 and bs is None:
            name = "fp8" if self.axis is None else "fp8_per_channel"
            return name + ("_dynamic" if dyn else "")
        if bs is not None and bs.scale_bits == E8M0:
            return {E2M1: "mxfp4", E4M3: "mxfp8", (3, 2): "mxfp6_e3m2", (2, 3): "mxfp6"}.get(
                nb, f"mx_{format_num_bits(nb)}"
            ) if isinstance(nb, tuple) else f"mxint{nb}"
        if nb == E4M3:  # block-wise fp8
            if bs.size is None and not bs.other_axes:
                return "fp8_per_token"
            if bs.other_axes:
                return "fp8_2d_block"
            return f"fp8_block{bs.size}"
        if (nb == E2M1 and bs is not None and bs.scale_bits == E4M3 and bs.axis == -1
                and not bs.other_axes and bs.scale_block_sizes is None and bs.size is not None):
            name = "nvfp4" if bs.size == 16 else f"nvfp4_bs{bs.size}"
            if bs.type == "static":
                name += "_static"
            if bs.four_over_six:
                name += "_four_over_six"
            if dyn:
                name += "_dynamic_global"
            return name
        if isinstance(nb, int):
            kind = f"int{nb}"
            if bs is not None:
                return f"{kind}_block{bs.size}" + ("" if bs.type == "static" else "_dynamic")
            return (kind if self.axis is None else f"{kind}_per_channel") + ("_dynamic" if dyn else "")
        name = format_num_bits(nb)
        if bs is not None:
            name += f"_block{bs.size}"
        return name

    @property
    def unsupported_reason(self) -> str | None:
        """None when jaxquant implements this config, else why not (for error messages).

        Disabled configs are always fine. Attributes that only matter to other tools
        (``trt_high_precision_dtype``, ``effective_bits``, ``pass_through_bwd``, ``fake_quant``)
        are ignored.
        """
        if self.rotation_unsupported_reason is not None:
            return self.rotation_unsupported_reason
        if not self.enable:
            return None
        fmt = self.format
        if fmt not in SUPPORTED_FORMATS:
            return f"format {fmt!r}"
        if self.bias is not None:
            from jaxquant.formats.affine import unsupported_reason

            why = unsupported_reason(self)
            if why is not None:
                return why
        if self.calibrator != "max":
            return f"calibrator {self.calibrator!r}"
        if self.unsigned or self.narrow_range:
            return "unsigned / narrow_range quantization"
        return None

    @property
    def is_dynamic(self) -> bool:
        """True when no calibration is needed at all: top-level ``type: dynamic``, or dynamic MX blocks (E8M0
        scales from each block at every call; ModelOpt's fake quant uses no amax for them)."""
        bs = self.block_sizes
        return self.type == "dynamic" or (bs is not None and bs.type == "dynamic" and bs.scale_bits == E8M0)

    @property
    def needs_calibration(self) -> bool:
        """True when an activation quantizer with this config collects amax from data."""
        return not (self.is_dynamic or self.use_constant_amax or self.constant_amax is not None)

    @property
    def fixed_amax(self) -> float | None:
        """The pinned amax of a constant-amax quantizer (448 for KV "cast"), else None."""
        if self.use_constant_amax:
            return 448.0
        return self.constant_amax


#: The ``format`` values jaxquant calibrates and fake-quantizes (``formats.registry.QUANTIZER_FORMATS``).
SUPPORTED_FORMATS = tuple(QUANTIZER_FORMATS)

_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(QuantizerConfig))


# --------------------------------------------------------------------------------- helpers
def parse_num_bits(v: Any, where: str = "num_bits", *, allow_str: bool = False) -> NumBits | str:
    """Parse ModelOpt's ``num_bits`` / ``scale_bits`` spellings.

    ``8`` -> 8; ``"e4m3"`` / ``"E4M3"`` / ``[4, 3]`` / ``(4, 3)`` -> ``(4, 3)``. Float pairs must be
    one of ModelOpt's supported (E, M) formats.

    Raises:
      RecipeError: naming ``where``.
    """
    if isinstance(v, str):
        m = _EXMY_RE.match(v.strip())
        if m:
            v = (int(m.group(1)), int(m.group(2)))
        elif allow_str:
            return v
        else:
            raise RecipeError(
                f"{_loc(where)}: {v!r} is not a valid num_bits; use an integer (8, 4) or an ExMy string "
                "(e4m3, e2m1)"
            )
    if isinstance(v, bool):
        raise RecipeError(f"{_loc(where)}: {v!r} is not a valid num_bits")
    if isinstance(v, int):
        if v < 1:
            raise RecipeError(f"{_loc(where)}: integer num_bits must be positive, got {v}")
        return v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v
    ):
        pair = (int(v[0]), int(v[1]))
        if pair == E8M0 and where.endswith("scale_bits"):
            return pair
        if pair not in _FP_NUM_BITS:
            raise RecipeError(
                f"{_loc(where)}: e{pair[0]}m{pair[1]} is not a supported float format; ModelOpt accepts "
                + ", ".join(format_num_bits(p) for p in _FP_NUM_BITS)
            )
        return pair
    raise RecipeError(
        f"{_loc(where)}: {v!r} is not a valid num_bits; use an integer (8, 4), an ExMy string (e4m3, "
        "e2m1) or an [E, M] pair"
    )


def format_num_bits(nb: NumBits | str) -> Any:
    """``(4, 3)`` -> ``"e4m3"``; ints and strings unchanged."""
    if isinstance(nb, tuple):
        return f"e{nb[0]}m{nb[1]}"
    return nb


def _loc(where: str) -> str:
    return where[:-2] if where.endswith(": ") else where


def _sub(where: str, key: Any) -> str:
    """Key path of ``key`` under ``where`` (``"f.yaml: "`` is a file root: no dot)."""
    if isinstance(key, int) and not isinstance(key, bool) and not str(key).startswith("-"):
        return f"{where}[{key}]"
    key = str(key)
    if not re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$-]*|-?\d+", key):
        return f"{where}[{key!r}]"
    if not where or where.endswith(": "):
        return f"{where}{key}"
    return f"{where}.{key}"


def _as_axis_key(k: Any) -> int | None:
    if isinstance(k, bool):
        return None
    if isinstance(k, int):
        return k
    if isinstance(k, str) and re.fullmatch(r"-?\d+", k.strip()):
        return int(k)
    return None


def _parse_axis(v: Any, where: str) -> int | tuple[int, ...] | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return tuple(v) if len(v) != 1 else v[0]
    raise RecipeError(f"{_loc(where)}: must be null, an integer or a list of integers, got {v!r}")


def _freeze(v: Any) -> Any:
    """Mappings -> sorted (key, value) tuples, lists -> tuples, recursively (hashable)."""
    if isinstance(v, Mapping):
        return tuple(sorted(((k, _freeze(x)) for k, x in v.items()), key=lambda kv: repr(kv[0])))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v: Any) -> Any:
    """Inverse of ``_freeze`` for values that were mappings (pairs of (key, value))."""
    if isinstance(v, tuple) and v and all(isinstance(p, tuple) and len(p) == 2 for p in v):
        return {k: _thaw(x) for k, x in v}
    return v


def _truthy_rotate(r: Any) -> bool:
    if isinstance(r, bool):
        return r
    if isinstance(r, tuple):
        return bool(dict(r).get("enable", False))
    return bool(r)
