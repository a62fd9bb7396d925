"""Every registered format against its committed golden digests (``golden/formats_cpu.json``, made on the CPU by
``golden/make_format_golden.py``; its ``--check`` mode compares a GPU's bytes with the same file).

Here: every ``QUANTIZER_FORMATS`` / ``FORMATS`` entry has goldens (a new format without them fails), and the CPU
recomputes them bit for bit (a few formats in bfloat16 in the fast test, all formats and dtypes in the slow one).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
REGENERATE = ("JAX_PLATFORMS=cpu python tests/numerics/golden/make_format_golden.py "
              "--write tests/numerics/golden/formats_cpu.json")


def _load_maker():
    spec = importlib.util.spec_from_file_location("jaxquant_make_format_golden", GOLDEN / "make_format_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mg = _load_maker()


@pytest.fixture(scope="module")
def golden():
    data = json.loads((GOLDEN / "formats_cpu.json").read_text())
    assert data["meta"]["backend"] == "cpu" and data["meta"]["format_version"] == mg.FORMAT_VERSION
    return data["digests"]


def test_every_registered_format_has_goldens(golden):
    from jaxquant.formats.examples import CONFIGS
    from jaxquant.formats.registry import FORMATS, QUANTIZER_FORMATS

    assert set(CONFIGS) == set(QUANTIZER_FORMATS), f"add the new format to formats/examples.py, then {REGENERATE}"
    for dt in mg.DTYPES:
        for name in QUANTIZER_FORMATS:
            assert f"fake_quant|{name}|{dt}" in golden and f"amax|{name}|{dt}" in golden, (name, REGENERATE)
        for fmt in FORMATS:
            assert f"dequantize|{fmt}|{dt}" in golden and f"export|{fmt}|{dt}|weight" in golden, (fmt, REGENERATE)


def _check(golden, dtypes, only=None):
    import jax

    with jax.default_device(jax.devices("cpu")[0]):
        got = mg.digests(mg.compute(mg.build_inputs(), dtypes, only))
    want = {k: v for k, v in golden.items()
            if k.split("|")[2] in dtypes and (only is None or k.split("|")[1] in only)}
    res = mg.compare(want, got)
    assert res["ok"], f"CPU recompute vs formats_cpu.json: {res['differ'][:8]} differ, missing {res['missing'][:4]}, " \
                      f"extra {res['extra'][:4]} (an intended change? {REGENERATE})"


def test_cpu_recomputes_some_bfloat16_goldens(golden):
    """A few formats of each kind (fast); every format and dtype: the slow test below."""
    _check(golden, ("bfloat16",), {"fp8", "nvfp4", "int4_block128+fp8", "mxfp4", "nvfp4_affine", "w4a8_awq", "nvfp4"})


@pytest.mark.slow
def test_cpu_recomputes_every_golden(golden):
    _check(golden, mg.DTYPES)


def test_compare_reports_what_differs():
    res = mg.compare({"a|x|f": "1", "b|y|f": "2"}, {"a|x|f": "1", "b|y|f": "3", "c|z|f": "4"})
    assert (res["ok"], res["differ"], res["extra"], res["missing"]) == (False, ["b|y|f"], ["c|z|f"], [])
