"""Golden digests of every registered format: fake quant and export storage bytes, CPU vs GPU.

    # on the CPU (what is committed):
    JAX_PLATFORMS=cpu python tests/numerics/golden/make_format_golden.py --write tests/numerics/golden/formats_cpu.json
    # on a CUDA GPU: recompute there, compare with the committed CPU digests, write a JSON report (exit 1 on a mismatch)
    python tests/numerics/golden/make_format_golden.py --check tests/numerics/golden/formats_cpu.json \
        --report golden_formats_gpu.json

Driven by ``jaxquant.formats.registry`` and ``jaxquant.formats.examples.CONFIGS`` (``tests/numerics/
test_format_golden.py`` fails when a registered format has no entry there), for fixed inputs (a seeded draw with edge rows: zeros, e2m1 / e4m3 ties, saturation, subnormals) in
float32, bfloat16 and float16:

* every ``QUANTIZER_FORMATS`` entry through a ``TensorQuantizer`` (``configure``, amax from the tensor itself as
  max calibration of a weight gives, ``fake_quant``): the amax / global amax bytes and the fake-quant output bytes;
  K/V formats with a bias (``*_affine``) on a ``[B, S, heads, D]`` tensor with a fixed bias;
* every ``FORMATS`` entry (the export side) from its first weight config: ``export_tensors`` (the stored tensors:
  packed codes, scales, ``input_scale``) and ``dequantize`` of them (what ``load_quantized`` reads back);
* the Hadamard rotation of ``rotate: true`` quantizers (``numerics/hadamard.py``).

Each output is stored as the SHA-256 of its raw bytes (the file stays a few KiB); ``--dump DIR`` also writes the
arrays (``.npy``) to look at a mismatch. Same digests on CPU and GPU = the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

SEED = 20261
DTYPES = ("float32", "bfloat16", "float16")
FORMAT_VERSION = 1
WEIGHT_SHAPE = (128, 256)  # multiples of the 128x128 FP8 blocks and the INT4 blocks
KV_SHAPE = (2, 8, 4, 64)  # [B, S, heads, head_dim] for the affine K/V formats

def _edges(cols: int) -> np.ndarray:
    """Edge rows tiled to ``cols``: zeros and signs, tiny values, e2m1 / e4m3 rounding ties, saturation, a zero block
    and a 1e-7..1e4 range (all finite in float16)."""
    b = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], np.float32)
    r0 = np.concatenate([[0.0, -0.0, 1e-8, -1e-8, 2.0**-10, 1.5 * 2.0**-10, 2.0**-9, -(2.0**-9)],
                         b, -b, b + 0.01, b - 0.01, [448.0, 449.0, 464.0, 470.0, 480.0, 500.0, -500.0, 1000.0]])
    r1 = np.sign(np.sin(np.arange(48))) * np.logspace(-7, 4, 48)
    r2 = np.where(np.arange(48) < 32, 0.0, np.linspace(-1e-3, 1e-3, 48))
    return np.stack([np.resize(r, cols) for r in (r0, r1, r2)]).astype(np.float32)


def build_inputs(seed: int = SEED) -> dict[str, np.ndarray]:
    """``{"weight": [128, 256], "kv": [2, 8, 4, 64], "kv_bias": [1, 1, 4, 64]}`` float32 (numpy's seeded generator:
    the same on every machine)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(WEIGHT_SHAPE) * rng.uniform(0.01, 20.0, (WEIGHT_SHAPE[0], 1))).astype(np.float32)
    w[:3] = _edges(WEIGHT_SHAPE[1])
    kv = (rng.standard_normal(KV_SHAPE) * 3.0 + 0.5).astype(np.float32)
    bias = (rng.standard_normal((1, 1) + KV_SHAPE[2:]) * 0.5).astype(np.float32)
    return {"weight": w, "kv": kv, "kv_bias": bias}


def compute(inputs: dict[str, np.ndarray], dtypes=DTYPES, only=None) -> dict[str, np.ndarray]:
    """``{"<kind>|<format>|<dtype>[|<tensor>]": host array}`` on JAX's default device (module doc), for ``dtypes``
    and the format names in ``only`` (None: all, and the rotation)."""
    import jax
    import jax.numpy as jnp

    from jaxquant.formats.examples import export_inputs, is_kv_only, quantizer
    from jaxquant.formats.registry import FORMATS, QUANTIZER_FORMATS
    from jaxquant.numerics.hadamard import rotate

    out: dict[str, object] = {}
    for dt in dtypes:
        w = jnp.asarray(inputs["weight"]).astype(dt)
        kv = jnp.asarray(inputs["kv"]).astype(dt)
        for name in QUANTIZER_FORMATS:
            if only is not None and name not in only:
                continue
            x = kv if is_kv_only(name) else w
            q = quantizer(name, x, inputs["kv_bias"])
            out[f"fake_quant|{name}|{dt}"] = q(x)
            out[f"amax|{name}|{dt}"] = q.amax[...]
            if q.global_amax is not None:
                out[f"global_amax|{name}|{dt}"] = q.global_amax[...]
        for fmt, qf in FORMATS.items():
            if only is not None and fmt not in only:
                continue
            w_amax, blk, in_amax = export_inputs(fmt, w)
            tensors = qf.export_tensors(w, w_amax, block_amax=blk, in_amax=in_amax)
            for k, v in tensors.items():
                out[f"export|{fmt}|{dt}|{k}"] = v
            out[f"dequantize|{fmt}|{dt}"] = qf.dequantize(tensors, jnp.float32)
        if only is not None:
            continue
        out[f"rotate|hadamard|{dt}"] = rotate(kv)
        out[f"rotate|hadamard_block16_fp32|{dt}"] = rotate(w, 16, True)
    return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}


def digest(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and raw bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.name}{list(a.shape)}".encode())
    h.update(a.reshape(-1).view(np.uint8).tobytes())
    return h.hexdigest()


def digests(outputs: dict[str, np.ndarray]) -> dict[str, str]:
    return {k: digest(v) for k, v in sorted(outputs.items())}


def _meta(device) -> dict:
    import jax

    return {"backend": device.platform, "device_kind": device.device_kind, "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "seed": SEED, "format_version": FORMAT_VERSION}


def compare(expected: dict[str, str], got: dict[str, str]) -> dict:
    """``{"ok", "missing", "extra", "differ"}`` of two digest tables."""
    differ = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    return {"ok": not (differ or missing or extra), "compared": len(expected.keys() & got.keys()),
            "differ": differ, "missing": missing, "extra": extra}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", help="write the digests (JSON) to this path")
    g.add_argument("--check", help="compare with the digests in this JSON file (the committed CPU goldens)")
    p.add_argument("--report", help="with --check: write the comparison as JSON here")
    p.add_argument("--platform", default=None, help="compute on this JAX platform (cpu, gpu); default: JAX's default")
    p.add_argument("--dump", default=None, help="also save every output array as .npy into this folder")
    args = p.parse_args(argv)
    import jax

    device = jax.devices(args.platform)[0] if args.platform else jax.devices()[0]
    with jax.default_device(device):
        outputs = compute(build_inputs())
    table = digests(outputs)
    meta = _meta(device)
    if args.dump:
        d = Path(args.dump)
        d.mkdir(parents=True, exist_ok=True)
        for k, v in outputs.items():
            np.save(d / (k.replace("|", "__").replace("+", "_") + ".npy"), v)
    if args.write:
        Path(args.write).write_text(json.dumps({"meta": meta, "digests": table}, indent=1, sort_keys=True) + "\n")
        print(f"{args.write}: {len(table)} digests on {device.platform} ({device.device_kind}), JAX {jax.__version__}")
        return 0
    ref = json.loads(Path(args.check).read_text())
    res = compare(ref["digests"], table)
    report = {"meta": meta, "reference_meta": ref["meta"], **res}
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    formats = sorted({k.split("|")[1] for k in res["differ"]})
    print(f"{device.platform} ({device.device_kind}) vs {ref['meta']['backend']} goldens: {res['compared']} outputs "
          f"compared, {len(res['differ'])} differ ({', '.join(formats) or 'none'}), {len(res['missing'])} missing, "
          f"{len(res['extra'])} extra -> {'OK' if res['ok'] else 'MISMATCH'}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for a plain checkout
    sys.exit(main())
