"""QuantizerConfig: ModelOpt dict spellings in and out, validation, format names, hashability."""

import pytest

from jaxquant.errors import RecipeError
from jaxquant.quantizer.config import (
    E2M1,
    E4M3,
    SUPPORTED_FORMATS,
    BlockSizes,
    QuantizerConfig,
    parse_num_bits,
)

NVFP4 = {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}


@pytest.mark.parametrize("spelling, value", [
    (8, 8), (4, 4), ("e4m3", (4, 3)), ("E2M1", (2, 1)), ([4, 3], (4, 3)), ((2, 1), (2, 1)),
    ("e5m2", (5, 2)),
])
def test_num_bits_spellings(spelling, value):
    assert parse_num_bits(spelling) == value


@pytest.mark.parametrize("bad", ["fp8", "e4m4", [4, 3, 1], 0, -8, True, 8.0, None, [4.0, 3.0]])
def test_bad_num_bits(bad):
    with pytest.raises(RecipeError, match="cfg.num_bits"):
        QuantizerConfig.from_dict({"num_bits": bad}, "cfg")


def test_nvfp4_parses_and_is_hashable():
    c = QuantizerConfig.from_dict(NVFP4, "x")
    assert c.num_bits == E2M1
    assert c.block_sizes == BlockSizes(size=16, axis=-1, type="dynamic", scale_bits=E4M3)
    assert c.format == "nvfp4" and c.needs_calibration and c.fixed_amax is None
    assert hash(c) == hash(QuantizerConfig.from_dict(dict(NVFP4), "y"))
    assert {c: 1}[QuantizerConfig.from_dict(NVFP4)] == 1


def test_all_fields_hashable_even_for_mapping_attributes():
    c = QuantizerConfig.from_dict({"num_bits": "e4m3", "bias": {-2: None, -4: None, "type": "static"},
                                   "rotate": {"enable": True, "mode": "rotate_back"},
                                   "backend": "x", "backend_extra_args": {"a": [1, 2]}})
    hash(c)
    for f in ("bias", "rotate", "backend_extra_args"):
        assert not isinstance(getattr(c, f), (dict, list))
    d = c.to_dict()
    assert d["bias"] == {-2: None, -4: None, "type": "static"}
    assert d["rotate"] == {"enable": True, "mode": "rotate_back"}
    assert QuantizerConfig.from_dict(d) == c


def test_rotate_config_canonicalized():
    off = QuantizerConfig.from_dict({"num_bits": 8, "rotate": {"enable": False, "mode": "rotate",
                                                               "rotate_fp32": False, "block_size": None}})
    on = QuantizerConfig.from_dict({"num_bits": 8, "rotate": {"enable": True}})
    assert off.rotate is False and on.rotate is True


@pytest.mark.parametrize("cfg", [
    NVFP4,
    {"num_bits": "e4m3", "axis": None},
    {"num_bits": "e4m3", "axis": 0},
    {"num_bits": "e4m3", "use_constant_amax": True},
    {"num_bits": "e4m3", "constant_amax": 2688.0, "type": "dynamic"},
    {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "static", "scale_bits": "e4m3"}, "enable": False},
    {"num_bits": "e4m3", "block_sizes": {-1: 128, -2: 128, "type": "static"}},
    {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}, "calibrator": "histogram"},
    {"num_bits": 8, "axis": [0, 1]},
    {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3",
                                          "four_over_six": True}},
    {"num_bits": "e2m1", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0",
                                          "scale_block_sizes": {-1: 4}}},
])
def test_round_trip(cfg):
    c = QuantizerConfig.from_dict(cfg, "x")
    for kw in ({}, {"exmy": True}, {"full": True}, {"exmy": True, "full": True}):
        assert QuantizerConfig.from_dict(c.to_dict(**kw)) == c, kw


def test_to_dict_matches_modelopt_resolved_spelling():
    c = QuantizerConfig.from_dict({**NVFP4, "effective_bits": 4.5})
    assert c.to_dict() == {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic",
                                                               "scale_bits": (4, 3)},
                           "effective_bits": 4.5}
    assert QuantizerConfig.from_dict({"num_bits": "e4m3", "axis": None}).to_dict(exmy=True) == \
        {"num_bits": "e4m3", "axis": None}
    assert QuantizerConfig(enable=False).to_dict() == {"enable": False, "num_bits": 8, "axis": None}


def test_json_style_string_axis_keys():
    c = QuantizerConfig.from_dict({"num_bits": [2, 1],
                                   "block_sizes": {"-1": 16, "type": "dynamic", "scale_bits": [4, 3]}})
    assert c.format == "nvfp4"


def test_modelopt_full_dump_is_accepted():
    mq = pytest.importorskip("modelopt.torch.quantization.config")
    dumped = mq.QuantizerAttributeConfig(num_bits=(4, 3), axis=None).model_dump()
    assert "learn_amax" in dumped
    assert QuantizerConfig.from_dict(dumped) == QuantizerConfig(num_bits=(4, 3))


@pytest.mark.parametrize("cfg, fmt", [
    ({"num_bits": "e4m3"}, "fp8"),
    ({"num_bits": "e4m3", "axis": 0}, "fp8_per_channel"),
    (NVFP4, "nvfp4"),
    ({"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "static", "scale_bits": "e4m3"}}, "nvfp4_static"),
    ({"num_bits": "e2m1", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e4m3"}}, "nvfp4_bs32"),
    ({"num_bits": "e2m1", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}}, "mxfp4"),
    ({"num_bits": "e4m3", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}}, "mxfp8"),
    ({"num_bits": 8, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}}, "mxint8"),
    ({"num_bits": "e4m3", "type": "dynamic", "block_sizes": {-1: None}}, "fp8_per_token"),
    ({"num_bits": "e4m3", "block_sizes": {-1: 128, -2: 128}}, "fp8_2d_block"),
    ({"num_bits": "e4m3", "type": "dynamic"}, "fp8_dynamic"),
    ({"num_bits": 8}, "int8"),
    ({"num_bits": 8, "axis": 0}, "int8_per_channel"),
    ({"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}, "int4_block128"),
    ({"num_bits": "e3m2", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}}, "mxfp6_e3m2"),
])
def test_format_names(cfg, fmt):
    c = QuantizerConfig.from_dict(cfg)
    assert c.format == fmt
    assert (c.unsupported_reason is None) == (fmt in SUPPORTED_FORMATS)


def test_unsupported_reason_ignores_disabled_and_flags_calibrator():
    assert QuantizerConfig(num_bits=8, enable=False).unsupported_reason is None
    assert "histogram" in QuantizerConfig(num_bits=E4M3, calibrator="histogram").unsupported_reason


@pytest.mark.parametrize("cfg, msg", [
    ({"num_bits": 8, "axis": 0, "block_sizes": {-1: 16}}, r"x\.block_sizes: cannot be combined with axis"),
    ({"num_bits": "e5m2"}, r"x\.num_bits: e5m2 is only valid with dynamic block quantization"),
    ({"num_bits": 8, "block_sizes": {"type": "dynamic"}}, r"x\.block_sizes: no blocked axis"),
    ({"num_bits": 8, "type": "sometimes"}, r"x\.type: must be 'static' or 'dynamic'"),
    ({"num_bits": 8, "calibrator": "mse"}, r"x\.calibrator: must be 'max' or 'histogram'"),
    ({"num_bits": 8, "constant_amax": -1.0}, r"x\.constant_amax: must be positive"),
    ({"num_bits": 8, "effective_bits": 20}, r"x\.effective_bits: must be in \(0, 16\]"),
    ({"num_bits": 8, "learn_amax": True}, r"x\.learn_amax: deprecated"),
    ({"num_bits": 8, "fake_quant": "yes"}, r"x\.fake_quant: must be true or false"),
    ({"num_bits": 8, "axis": "0"}, r"x\.axis: must be null"),
    ({"numbits": 8}, r"x\.numbits: unknown quantizer attribute"),
    ({"enable": True}, r"x: a cfg of only \{enable: true\}"),
])
def test_validation_messages(cfg, msg):
    with pytest.raises(RecipeError, match=msg):
        QuantizerConfig.from_dict(cfg, "x")


def test_existing_api_unchanged():
    c = QuantizerConfig(num_bits=E2M1, block_sizes=BlockSizes(size=16, type="dynamic", scale_bits=E4M3))
    assert c.format == "nvfp4" and c.block_sizes.size == 16
    kv = QuantizerConfig(num_bits=E4M3, use_constant_amax=True)
    assert kv.fixed_amax == 448.0 and not kv.needs_calibration
    assert QuantizerConfig(num_bits=E4M3, type="dynamic").is_dynamic
    assert c.replace(enable=False).enable is False
