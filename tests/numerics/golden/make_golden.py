"""Golden bytes of jaxquant's quantization functions, for the cross-backend bit-identity test.

    python tests/numerics/golden/make_golden.py --out tests/numerics/golden/gpu.npz   # on a CUDA GPU
    JAX_PLATFORMS=cpu python tests/numerics/golden/make_golden.py --out tests/numerics/golden/cpu.npz

No XLA flag is needed: on NVIDIA GPUs XLA compiles float32 division to the approximate
``div.full.f32``, and ``jaxquant.numerics._exact.div`` rounds its quotient exactly in integer
arithmetic (docs/numerics.md, "XLA pitfalls"). The flags the file was made under are recorded in it.

For fixed inputs (a seeded random draw and hand-picked edge values, in float32, bfloat16 and float16,
of shapes with batch axes and a last axis that is not a multiple of 16) it computes, on JAX's default
backend (or ``--platform``):

* ``fp8.fake_quant`` (per-tensor amax = max|x|, half of it (clipping), zero; per-channel amax),
* ``fp8.quantize`` (the ``float8_e4m3fn`` bytes and the scale),
* ``nvfp4.fake_quant_dynamic`` and ``nvfp4.fake_quant_static`` (calibrated and shrunk block amax),
* ``nvfp4.quantize`` (packed codes, ``float8_e4m3fn`` block scales, global scale; dynamic, with a
  smaller global amax, and static from block amax),

and writes every input and output as raw bytes into one ``.npz`` (well under 2 MB) together with the
backend it ran on. ``tests/numerics/test_golden.py`` recomputes the outputs on the CPU from the stored
inputs and compares the bytes. NaN/Inf inputs are a separate group, compared NaN-aware (where a NaN
is and everything else bit for bit), because a NaN's payload is not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

SEED = 20260
DTYPES = ("float32", "bfloat16", "float16")
FORMAT_VERSION = 1


def _edges() -> np.ndarray:
    """Hand-picked float32 values: zeros, signs, subnormals, e2m1 / e4m3 rounding ties and saturation
    (all finite in float16 after the cast)."""
    e2m1_bounds = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], np.float32)
    row0 = np.concatenate([
        [0.0, -0.0, 1e-8, -1e-8, 2.0**-10, 1.5 * 2.0**-10, 2.0**-9, -(2.0**-9)],
        e2m1_bounds, -e2m1_bounds, e2m1_bounds + 0.01, e2m1_bounds - 0.01,
        [448.0, 449.0, 464.0, 470.0, 480.0, 500.0, -500.0, 1000.0],
    ]).astype(np.float32)
    row1 = (np.sign(np.sin(np.arange(48))) * np.logspace(-7, 4, 48)).astype(np.float32)  # wide range
    row2 = np.where(np.arange(48) < 16, 0.0, np.linspace(-1e-3, 1e-3, 48)).astype(np.float32)  # zero block
    return np.stack([row0, row1, row2])


def _nonfinite() -> np.ndarray:
    x = np.linspace(-3.0, 3.0, 32, dtype=np.float32)
    x[[1, 17]] = np.nan
    x[5] = np.inf
    x[20] = -np.inf
    return x[None]


def build_inputs(seed: int = SEED) -> dict[str, np.ndarray]:
    """``{name: float32 array}``; the dtype variants are cast from these."""
    rng = np.random.default_rng(seed)
    return {
        "rand_4x64": (rng.standard_normal((4, 64)) * 2.0).astype(np.float32),
        "rand_3x40": (rng.standard_normal((3, 40)) * 3.0).astype(np.float32),
        "rand_2x3x32": (rng.standard_normal((2, 3, 32)) * rng.uniform(0.01, 50.0, (2, 3, 1))).astype(np.float32),
        "edges_3x48": _edges(),
        "nonfinite_1x32": _nonfinite(),
    }


def _as_bytes(a) -> tuple[np.ndarray, str, tuple[int, ...]]:
    a = np.asarray(a)
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8), a.dtype.name, a.shape


def _compute_one(x, finite: bool) -> dict[str, object]:
    """Every output for one input array (traced: the whole set is one jitted computation, as the
    functions run inside a model's jit)."""
    import jax.numpy as jnp

    from jaxquant.numerics import fp8, nvfp4

    out: dict[str, object] = {}
    ax = jnp.abs(x.astype(jnp.float32))
    amax = jnp.max(jnp.where(jnp.isfinite(ax), ax, 0.0))
    amaxes = {"max": amax, "half": amax * 0.5, "zero": jnp.float32(0.0)} if finite else {"four": jnp.float32(4.0)}
    for tag, a in amaxes.items():
        out[f"fp8.fake_quant|{tag}"] = fp8.fake_quant(x, a)
        out[f"nvfp4.fake_quant_dynamic|{tag}"] = nvfp4.fake_quant_dynamic(x, a)
    rows = ax.reshape(-1, x.shape[-1])
    pc = jnp.max(jnp.where(jnp.isfinite(rows), rows, 0.0), axis=-1).reshape(*x.shape[:-1], 1)
    out["fp8.fake_quant|per_channel"] = fp8.fake_quant(x, pc)
    ba = nvfp4.block_amax(jnp.where(jnp.isfinite(x), x, 0))
    for tag, b in (("calibrated", ba), ("shrunk", ba * 0.8)):
        out[f"nvfp4.fake_quant_static|{tag}"] = nvfp4.fake_quant_static(x, b, jnp.max(b))
    if not finite:
        return out
    for tag in ("max", "half"):
        q, s = fp8.quantize(x, amaxes[tag])
        out[f"fp8.quantize.q|{tag}"] = q
        out[f"fp8.quantize.scale|{tag}"] = s
    for tag, kw in (("dynamic", {}), ("global_half", {"global_amax": amax * 0.5}), ("static", {"block_amax": ba})):
        t = nvfp4.quantize(x, **kw)
        out[f"nvfp4.quantize.packed|{tag}"] = t.packed
        out[f"nvfp4.quantize.block_scale|{tag}"] = t.block_scale
        out[f"nvfp4.quantize.global_scale|{tag}"] = t.global_scale
    return out


def compute(inputs: dict[str, np.ndarray]) -> dict[str, object]:
    """``{"<function>|<input>|<dtype>|<variant>": output}`` for every input and dtype (module doc),
    one jitted computation per input and dtype, on JAX's default device."""
    import functools

    import jax
    import jax.numpy as jnp

    out: dict[str, object] = {}
    for name, x32 in inputs.items():
        fn = jax.jit(functools.partial(_compute_one, finite=bool(np.isfinite(x32).all())))
        for dt in DTYPES:
            for key, v in fn(jnp.asarray(x32).astype(dt)).items():
                f, variant = key.split("|")
                out[f"{f}|{name}|{dt}|{variant}"] = v
    return out


def to_npz_dict(inputs: dict[str, np.ndarray], outputs: dict[str, object], meta: dict) -> dict[str, np.ndarray]:
    arrays, layout = {}, {}
    for prefix, d in (("in", inputs), ("out", outputs)):
        for key, a in d.items():
            b, dtype, shape = _as_bytes(a)
            arrays[f"{prefix}/{key}"] = b
            layout[f"{prefix}/{key}"] = [dtype, list(shape)]
    meta = dict(meta, layout=layout, format_version=FORMAT_VERSION)
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    return arrays


def read_npz(path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(meta, inputs as float32 arrays, outputs as raw bytes)`` of a golden file."""
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        inputs = {k[3:]: z[k].view(np.float32).reshape(meta["layout"][k][1]) for k in z.files if k.startswith("in/")}
        outputs = {k[4:]: np.array(z[k]) for k in z.files if k.startswith("out/")}
    return meta, inputs, outputs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--platform", default=None, help="compute on this JAX platform (cpu, gpu, tpu); default: JAX's default")
    args = p.parse_args(argv)
    import jax

    device = jax.devices(args.platform)[0] if args.platform else jax.devices()[0]
    inputs = build_inputs()
    with jax.default_device(device):
        outputs = {k: jax.device_get(v) for k, v in compute(inputs).items()}
    meta = {"backend": device.platform, "device_kind": device.device_kind, "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "seed": SEED}
    arrays = to_npz_dict(inputs, outputs, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"{out}: {len(outputs)} outputs on {device.platform} ({device.device_kind}), JAX {jax.__version__}, "
          f"{out.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for a plain checkout
    sys.exit(main())
