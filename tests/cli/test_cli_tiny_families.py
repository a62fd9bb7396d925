"""``jaxquant ptq --pack`` with the *default* evaluation on tiny random checkpoints of every supported family, as a
new user gets them: saved by transformers, a byte-level tokenizer with no special tokens (no BOS/EOS/PAD/UNK, so
``--pack`` must do without the tokenizer's pad id, falling back to ``config.json``'s ids) and
``max_position_embeddings`` 512 (issue 10). Half of the families name a ``bos_token_id`` in ``config.json``: where a
BOS is prepended to the perplexity windows, the default 512 tokens + BOS do not fit and must be clamped to 511. The
windows the CLI actually evaluates are recorded (at ``jaxquant.eval.perplexity``) and must fit.

Each family's checkpoint is written and quantized once per module (``_runs``); the tests then check the run's exit
status and perplexities, the export's ``hf_quant_config.json``, ``load_quantized`` of the export, ``jaxquant eval``
of the export (default settings again), ``jaxquant check`` of the export and, for the FP8-KV recipe, ``k_scale`` /
``v_scale`` of every attention layer.

Slow (marked): about 6-7 minutes for the 9 checkpoints on 2 busy CPU cores (~10-30 s per ptq run, ~10 s per eval;
each run compiles the forward for 512-token windows twice, and the eval of the export once more).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _tiny_families import BOS_IN_CONFIG, FAMILIES, MAX_POS, write_tiny_family

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from jaxquant.cli import main

MIXED = "general/ptq/fp8_qkvo-nvfp4_mlp"
KV_FP8 = "general/ptq/nvfp4_default-kv_fp8"
KV_FAMILIES = ("gemma4", "llama")  # Gemma 4 (the seed's family) and one dense family get the FP8 KV recipe
RECIPES = {f: (KV_FP8 if f in KV_FAMILIES else MIXED) for f in FAMILIES}
N_LAYERS = 2

pytestmark = pytest.mark.slow


def _ptq_argv(model: Path, export: Path, recipe: str) -> list[str]:
    # default evaluation: neither --eval-seq nor --eval-windows nor --eval-dataset
    return ["ptq", "--model", str(model), "--recipe", recipe, "--pack", "--calib-size", "8", "--calib-seq", "64",
            "--export-path", str(export), "--quiet"]


def _main(argv: list[str]) -> tuple[int, str, str, float, list[tuple[int, ...]]]:
    """``main(argv)`` in-process: (exit status, stdout, stderr, seconds, shapes of the perplexity windows)."""
    import jaxquant.eval

    shapes: list[tuple[int, ...]] = []
    orig = jaxquant.eval.perplexity

    def recording(*a, **kw):  # the CLI imports jaxquant.eval.perplexity when it evaluates
        shapes.append(np.asarray(inspect.signature(orig).bind(*a, **kw).arguments["token_windows"]).shape)
        return orig(*a, **kw)

    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(jaxquant.eval, "perplexity", recording)
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0, shapes


class _Runs:
    """Lazily writes each family's checkpoint and runs ``ptq`` on it, once per module."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[str, dict] = {}

    def __call__(self, family: str) -> dict:
        if family not in self.cache:
            src = write_tiny_family(family, self.root / family / "src")
            export = self.root / family / "export"
            rc, out, err, dt, shapes = _main(_ptq_argv(src, export, RECIPES[family]))
            self.cache[family] = {"src": src, "export": export, "rc": rc, "out": out, "err": err, "seconds": dt,
                                  "windows": shapes}
        return self.cache[family]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _Runs(tmp_path_factory.mktemp("tiny_families"))


def _ok(run: dict) -> dict:
    """The run, or a failure naming the ptq error (the dependent tests cannot check anything without it)."""
    if run["rc"] != 0:
        pytest.fail(f"jaxquant ptq exited {run['rc']}: {run['err'].strip()[-2000:]}")
    return run


def _perplexities(out: str) -> list[float]:
    return [float(line.split()[1]) for line in out.splitlines() if line.startswith(("original ", "quantized "))]


def _check_windows(out: str, shapes: list[tuple[int, ...]], family: str) -> None:
    """The default 16 windows, each (text tokens + BOS, if one is prepended) within ``max_position_embeddings``, and
    the default 512 shortened by at most the one BOS position."""
    m = re.search(r"perplexity on .*: (\d+) windows x (\d+) tokens", out)
    assert m, out
    n, seq = int(m[1]), int(m[2])
    assert shapes and all(s == shapes[0] for s in shapes), shapes
    rows, width = shapes[0]
    assert n == rows == 16, (family, n, shapes)
    assert width <= MAX_POS, f"{family}: perplexity windows of {width} positions > max_position_embeddings {MAX_POS}"
    assert seq in (width, width - 1) and seq >= MAX_POS - 1, (family, seq, width, BOS_IN_CONFIG[family])


def _safetensors_keys(d: Path) -> set[str]:
    keys: set[str] = set()
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            keys |= set(json.loads(fh.read(n))) - {"__metadata__"}
    return keys


@pytest.mark.parametrize("family", FAMILIES)
def test_ptq_pack_with_default_eval(family, runs):
    run = _ok(runs(family))
    out = run["out"]
    print(f"{family}: ptq {run['seconds']:.1f} s\n{out[out.find('time per phase'):]}")
    ppl = _perplexities(out)
    assert len(ppl) == 2, out
    assert all(math.isfinite(p) and p > 1.0 for p in ppl), ppl
    _check_windows(out, run["windows"], family)
    assert "packed" in run["out"]
    assert (run["export"] / "hf_quant_config.json").is_file()
    assert (run["export"] / "config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_back(family, runs):
    import jax.numpy as jnp

    import jaxquant

    run = _ok(runs(family))
    loaded = jaxquant.load_quantized(run["export"], dtype=jnp.float32)
    ids = jnp.asarray(np.arange(32, dtype=np.int32)[None] + 65)
    logits = np.asarray(loaded.model(ids, jnp.ones_like(ids)))
    assert logits.shape == (1, 32, loaded.config.vocab_size) and np.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_of_export_with_defaults(family, runs):
    run = _ok(runs(family))
    rc, out, err, dt, shapes = _main(["eval", "--model", str(run["export"]), "--quiet"])
    print(f"{family}: eval {dt:.1f} s")
    assert rc == 0, err
    line = [x for x in out.splitlines() if x.startswith("perplexity:")]
    assert len(line) == 1 and math.isfinite(float(line[0].split()[1])), out
    _check_windows(out, shapes, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_check_passes_on_export(family, runs):
    """``jaxquant check`` (the validator of issue 10) finds nothing in the export."""
    run = _ok(runs(family))
    rc, out, err, _, _ = _main(["check", str(run["export"])])
    assert rc == 0, out + err


@pytest.mark.parametrize("family", KV_FAMILIES)
def test_fp8_kv_scales_for_every_attention_layer(family, runs):
    """ModelOpt writes k_scale/v_scale for every attention layer, including the v_proj.v_scale of Gemma 4's k=v
    (no v_proj) full-attention layer, and kv_cache_quant_algo FP8."""
    run = _ok(runs(family))
    hq = json.loads((run["export"] / "hf_quant_config.json").read_text())["quantization"]
    assert hq["kv_cache_quant_algo"] == "FP8", hq
    keys = _safetensors_keys(run["export"])
    missing = [f"model.layers.{i}.self_attn.{p}" for i in range(N_LAYERS)
               for p in ("k_proj.k_scale", "v_proj.v_scale") if f"model.layers.{i}.self_attn.{p}" not in keys]
    assert not missing, f"missing KV scales: {missing}"
