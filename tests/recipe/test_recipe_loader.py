"""Recipe loading: name resolution, imports, legacy forms, validation messages."""

import textwrap

import pytest

from jaxquant.errors import RecipeError, UnsupportedError
from jaxquant.quantizer.config import QuantizerConfig
from jaxquant.recipe import (
    Recipe,
    builtin_root,
    list_recipes,
    load_config,
    load_recipe,
    recipe_from_dict,
    resolve_recipe_path,
)

SCHEMA = "# modelopt-schema: modelopt.torch.quantization.config."


def write(tmp_path, rel, text):
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


RECIPE_HEAD = """
metadata:
  recipe_type: ptq
  description: test
"""


# ------------------------------------------------------------------------------ name resolution
def test_builtin_name_with_and_without_suffix():
    a = load_recipe("general/ptq/nvfp4_default-kv_fp8")
    b = load_recipe("general/ptq/nvfp4_default-kv_fp8.yaml")
    assert a.quant_cfg == b.quant_cfg
    assert a.name == "general/ptq/nvfp4_default-kv_fp8"
    assert resolve_recipe_path("general/ptq/nvfp4_default-kv_fp8").parent == builtin_root() / "general/ptq"


def test_path_to_a_user_file(tmp_path, monkeypatch):
    p = write(tmp_path, "mine.yaml", RECIPE_HEAD + """
        quantize:
          algorithm: max
          quant_cfg:
            - quantizer_name: '*'
              enable: false
            - quantizer_name: '*weight_quantizer'
              cfg: {num_bits: e4m3, axis: 0}
        """.replace("\n        ", "\n"))
    r = load_recipe(p)
    assert r.quant_cfg[1].cfg.format == "fp8_per_channel"
    assert r.source == str(p)
    monkeypatch.chdir(tmp_path)
    assert load_recipe("mine").quant_cfg == r.quant_cfg  # relative path, suffix probed


def test_unknown_name_lists_builtins():
    with pytest.raises(RecipeError, match="general/ptq/fp8_default-kv_fp8"):
        load_recipe("general/ptq/no_such_recipe")


def test_every_modelopt_general_ptq_recipe_ships():
    """nvidia-modelopt's own general/ptq recipes (its installed modelopt_recipes package) all ship and load."""
    mo = pytest.importorskip("modelopt_recipes")
    from pathlib import Path

    theirs = sorted(f"general/ptq/{p.stem}" for p in (Path(list(mo.__path__)[0]) / "general" / "ptq").glob("*.yaml"))
    assert theirs and set(theirs) <= set(list_recipes())
    for name in theirs:
        load_recipe(name)


def test_list_recipes():
    names = list_recipes()
    assert "general/ptq/fp8_qkvo-nvfp4_mlp" in names and all(n.startswith("general/ptq/") for n in names)


def test_directory_recipe(tmp_path):
    write(tmp_path, "r/metadata.yaml", "recipe_type: ptq\ndescription: dir recipe\n")
    write(tmp_path, "r/quantize.yaml", """
        imports:
          fp8: configs/numerics/fp8
        algorithm: max
        quant_cfg:
          - quantizer_name: '*'
            enable: false
          - quantizer_name: '*input_quantizer'
            cfg: {$import: fp8}
        """)
    r = load_recipe(tmp_path / "r")
    assert r.description == "dir recipe"
    assert r.quant_cfg[1].cfg == QuantizerConfig(num_bits=(4, 3))


# ------------------------------------------------------------------------------ imports
def test_import_merge_inline_override_and_local_snippets(tmp_path):
    write(tmp_path, "units/mine.yaml", f"""
        {SCHEMA}QuantizerCfgListConfig
        imports:
          nvfp4: configs/numerics/nvfp4
        ---
        - quantizer_name: '*mlp*weight_quantizer'
          cfg:
            $import: nvfp4
        - quantizer_name: '*[kv]_bmm_quantizer'
          cfg:
            $import: nvfp4
            use_constant_amax: true
        """)
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + """
        imports:
          disable_all: configs/ptq/units/base_disable_all
          mine: units/mine
        quantize:
          quant_cfg:
            - $import: disable_all
            - $import: mine
        """.replace("\n        ", "\n"))
    r = load_recipe(p)
    assert [e.quantizer_name for e in r.quant_cfg] == ["*", "*mlp*weight_quantizer", "*[kv]_bmm_quantizer"]
    assert r.quant_cfg[2].cfg.use_constant_amax and r.quant_cfg[2].cfg.format == "nvfp4"
    assert r.method == "max"  # ModelOpt's default when algorithm is absent


def test_local_snippet_overrides_builtin(tmp_path):
    # Imports look in the recipe's own folder before the built-in one (ModelOpt: cwd first).
    write(tmp_path, "configs/numerics/fp8.yaml", f"{SCHEMA}QuantizerAttributeConfig\nnum_bits: e4m3\naxis: 0\n")
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + """
imports:
  w8a8: configs/ptq/units/w8a8_fp8_fp8
quantize:
  quant_cfg:
    - $import: w8a8
""")
    r = load_recipe(p)
    assert r.quant_cfg[0].cfg.axis == 0


def test_missing_import(tmp_path):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + "imports:\n  x: configs/nope\nquantize:\n  quant_cfg: []\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: imports\.x: cannot find 'configs/nope'"):
        load_recipe(p)


def test_unknown_import_reference(tmp_path):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + """
imports:
  fp8: configs/numerics/fp8
quantize:
  quant_cfg:
    - quantizer_name: '*'
      cfg: {$import: fp16}
""")
    with pytest.raises(RecipeError, match=r"quant_cfg\[0\]\.cfg\.\$import: unknown import 'fp16'"):
        load_recipe(p)


def test_import_name_must_be_a_string(tmp_path):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + "imports:\n  off: configs/ptq/units/base_disable_all\n"
              "quantize:\n  quant_cfg: []\n")
    with pytest.raises(RecipeError, match="import name False must be a string"):
        load_recipe(p)


def test_import_cycle(tmp_path):
    write(tmp_path, "a.yaml", f"{SCHEMA}QuantizerCfgListConfig\nimports:\n  b: b\n---\n- $import: b\n")
    write(tmp_path, "b.yaml", f"{SCHEMA}QuantizerCfgListConfig\nimports:\n  a: a\n---\n- $import: a\n")
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + "imports:\n  a: a\nquantize:\n  quant_cfg:\n    - $import: a\n")
    with pytest.raises(RecipeError, match="import cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_recipe(p)


def test_import_escaping_the_roots(tmp_path):
    (tmp_path / "outside.yaml").write_text(f"{SCHEMA}QuantizerCfgEntry\nquantizer_name: '*'\nenable: false\n")
    p = write(tmp_path, "sub/r.yaml", RECIPE_HEAD + "imports:\n  x: ../outside\nquantize:\n  quant_cfg:\n    - $import: x\n")
    with pytest.raises(RecipeError, match="escapes the recipe root"):
        load_recipe(p)
    p2 = write(tmp_path, "sub/r2.yaml", RECIPE_HEAD
               + f"imports:\n  x: {tmp_path / 'outside.yaml'}\nquantize:\n  quant_cfg:\n    - $import: x\n")
    with pytest.raises(RecipeError, match="outside the recipe roots"):
        load_recipe(p2)
    # Allowed once the folder is a root.
    assert load_recipe(p2, roots=[tmp_path]).quant_cfg[0].quantizer_name == "*"


def test_import_needs_schema_preamble(tmp_path):
    write(tmp_path, "snip.yaml", "quantizer_name: '*'\nenable: false\n")
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + "imports:\n  s: snip\nquantize:\n  quant_cfg:\n    - $import: s\n")
    with pytest.raises(RecipeError, match="modelopt-schema"):
        load_recipe(p)


def test_attribute_import_cannot_be_spliced_into_quant_cfg(tmp_path):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + """
imports:
  fp8: configs/numerics/fp8
quantize:
  quant_cfg:
    - $import: fp8
""")
    with pytest.raises(RecipeError, match="schema QuantizerAttributeConfig"):
        load_recipe(p)


def test_error_in_imported_snippet_names_that_file(tmp_path):
    write(tmp_path, "bad.yaml", f"{SCHEMA}QuantizerAttributeConfig\nnum_bits: e9m9\n")
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + "imports:\n  b: bad\nquantize:\n  quant_cfg: []\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: num_bits: e9m9"):
        load_recipe(p)


def test_load_config_snippets():
    cfg = load_config("configs/numerics/nvfp4")
    assert QuantizerConfig.from_dict(cfg).format == "nvfp4"
    units = load_config("configs/ptq/units/kv_fp8_cast")
    assert units[0]["cfg"]["use_constant_amax"] is True


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "entry, message",
    [
        ("{quantizer_name: '*', cfg: {num_bits: e4m3}, foo: 1}", r"\.foo: unknown quant_cfg entry key"),
        ("{quantizer_name: '*', cfg: {num_bits: e4m3, axs: 0}}", r"\.cfg\.axs: unknown quantizer attribute"),
        ("{quantizer_name: '*', cfg: {num_bits: fp8}}", r"\.cfg\.num_bits: 'fp8' is not a valid num_bits"),
        ("{quantizer_name: '*', cfg: {num_bits: [4, 4]}}", r"\.cfg\.num_bits: e4m4 is not a supported float format"),
        ("{quantizer_name: '*', cfg: {num_bits: e2m1, block_sizes: {-1: 16, -2: 16, type: dynamic}}}",
         r"\.cfg\.block_sizes: dynamic block quantization supports exactly one axis"),
        ("{quantizer_name: '*', cfg: {num_bits: e2m1, block_sizes: {-1: 0, type: dynamic}}}",
         r"\.cfg\.block_sizes\.-1: block size must be a positive integer"),
        ("{quantizer_name: '*', cfg: {num_bits: e2m1, block_sizes: {-1: 16, kind: dynamic}}}",
         r"\.cfg\.block_sizes\.kind: unknown block_sizes key"),
        ("{quantizer_name: '*', cfg: {num_bits: e4m3, axis: 0, block_sizes: {-1: 16}}}",
         r"\.cfg\.block_sizes: cannot be combined with axis"),
        ("{quantizer_name: '*', cfg: {enable: true}}", r"\.cfg: a cfg of only \{enable: true\}"),
        ("{quantizer_name: '*'}", r": entry for '\*' has neither 'cfg' nor 'enable'"),
        ("{cfg: {num_bits: e4m3}}", r"\.quantizer_name: required"),
        ("{quantizer_name: '*', cfg: {}}", r"\.cfg: empty cfg"),
        ("{quantizer_name: '*', enable: 'no'}", r"\.enable: must be true or false"),
        ("{quantizer_name: '*', cfg: {num_bits: e4m3, use_constant_amax: true, constant_amax: 5}}",
         r"\.cfg: use_constant_amax and constant_amax are mutually exclusive"),
    ],
)
def test_invalid_entries_name_file_and_key_path(tmp_path, entry, message):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + f"quantize:\n  algorithm: max\n  quant_cfg:\n    - {entry}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: quantize\.quant_cfg\[0\]" + message):
        load_recipe(p)


def test_unknown_top_level_and_quantize_keys(tmp_path):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + "quantise:\n  quant_cfg: []\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: quantise: unknown top-level key"):
        load_recipe(p)
    p = write(tmp_path, "r2.yaml", RECIPE_HEAD + "quantize:\n  quant_cfg: []\n  algo: max\n")
    with pytest.raises(RecipeError, match=r"r2\.yaml: quantize\.algo: unknown key"):
        load_recipe(p)


def test_missing_metadata_and_quantize(tmp_path):
    p = write(tmp_path, "r.yaml", "quantize:\n  quant_cfg: []\n")
    with pytest.raises(RecipeError, match="missing 'metadata'"):
        load_recipe(p)
    p = write(tmp_path, "r2.yaml", RECIPE_HEAD)
    with pytest.raises(RecipeError, match="must contain 'quantize'"):
        load_recipe(p)


def test_other_recipe_types_unsupported(tmp_path):
    p = write(tmp_path, "r.yaml", "metadata: {recipe_type: auto_quantize}\nauto_quantize: {}\n")
    with pytest.raises((UnsupportedError, RecipeError)):
        load_recipe(p)


def test_duplicate_yaml_keys(tmp_path):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + "quantize:\n  quant_cfg: []\n  quant_cfg: []\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: line 6: duplicate key 'quant_cfg'"):
        load_recipe(p)


def test_unsupported_format_lists_supported(tmp_path):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + """
quantize:
  algorithm: max
  quant_cfg:
    - quantizer_name: '*'
      enable: false
    - quantizer_name: '*weight_quantizer'
      cfg: {num_bits: e1m2, block_sizes: {-1: 32, type: dynamic, scale_bits: e8m0}}
    - quantizer_name: '*lm_head*'
      cfg: {num_bits: e0m3, block_sizes: {-1: 32, type: dynamic, scale_bits: e8m0}}
      enable: false
""")
    with pytest.raises(UnsupportedError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert "quant_cfg[1]" in msg and "'mx_e1m2'" in msg and "not support yet" in msg
    assert ("fp8, fp8_per_channel, fp8_per_token, nvfp4, nvfp4_static, nvfp4_bs32, int8, int8_per_channel, "
            "fp8_2d_block, mxfp8, mxfp4, int4_block32, int4_block64, int4_block128") in msg
    assert "mx_e0m3" not in msg  # disabled entries do not count (MX E0M3 is not implemented)
    r = load_recipe(p, check_supported=False)
    assert r.unsupported() and r.quant_cfg[1].cfg.format == "mx_e1m2"


@pytest.mark.parametrize(
    "cfg, fmt",
    [
        ("{num_bits: e2m1, block_sizes: {-1: 64, type: dynamic, scale_bits: e4m3}}", "nvfp4_bs64"),
        ("{num_bits: e1m2, block_sizes: {-1: 32, type: dynamic, scale_bits: e8m0}}", "mx_e1m2"),
        ("{num_bits: e4m3, type: dynamic, block_sizes: {-1: 128, type: dynamic}}", "fp8_block128"),
        ("{num_bits: e4m3, axis: null, bias: {-2: null, -4: null, type: dynamic}}", "affine bias {type: dynamic"),
        ("{num_bits: e2m1, block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3}, rotate: {enable: true, "
         "mode: rotate_back}}", "rotate mode 'rotate_back'"),
        ("{num_bits: e2m1, block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3, four_over_six: true}}",
         "nvfp4_four_over_six"),
        ("[{num_bits: e4m3}, {num_bits: 4, block_sizes: {-1: 128, type: static}}]", "fp8 then int4_block128"),
    ],
)
def test_unsupported_formats(tmp_path, cfg, fmt):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD
              + f"quantize:\n  quant_cfg:\n    - quantizer_name: '*weight_quantizer'\n      cfg: {cfg}\n")
    with pytest.raises(UnsupportedError, match=fmt):
        load_recipe(p)


def test_unsupported_algorithm(tmp_path):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + """
quantize:
  algorithm: {method: lsq, perc_damp: 0.01}
  quant_cfg:
    - quantizer_name: '*weight_quantizer'
      cfg: {num_bits: e4m3}
""")
    with pytest.raises(UnsupportedError, match="calibration algorithm 'lsq'"):
        load_recipe(p)
    r = load_recipe(p, check_supported=False)
    assert r.method == "lsq" and r.algorithm_options == {"perc_damp": 0.01}


# ------------------------------------------------------------------------------ legacy + dicts
def test_legacy_quantize_dict_form_hoists_default(tmp_path):
    p = write(tmp_path, "r.yaml", RECIPE_HEAD + """
quantize:
  algorithm: max
  quant_cfg:
    '*weight_quantizer': {num_bits: e4m3, axis: null}
    '*input_quantizer': {num_bits: e4m3, axis: null}
    '*lm_head*': {enable: false}
    default: {enable: false}
    nn.Embedding: {'*': {enable: false}, '*weight_quantizer': {num_bits: 8, enable: false}}
""")
    r = load_recipe(p)
    names = [(e.quantizer_name, e.parent_class, e.enable) for e in r.quant_cfg]
    assert names == [("*", None, False), ("*weight_quantizer", None, None),
                     ("*input_quantizer", None, None), ("*lm_head*", None, False),
                     ("*", "nn.Embedding", False), ("*weight_quantizer", "nn.Embedding", False)]
    assert r.quant_cfg[5].cfg == QuantizerConfig(num_bits=8, enable=False)
    assert "quant_cfg['*lm_head*']" in r.quant_cfg[3].where


def test_recipe_from_dict_forms():
    import jaxquant.recipe as R

    listed = recipe_from_dict({"quant_cfg": [{"quantizer_name": "*", "enable": False},
                                             {"quantizer_name": "*weight_quantizer",
                                              "cfg": {"num_bits": (4, 3), "axis": None}}],
                               "algorithm": "max"})
    legacy = recipe_from_dict({"quant_cfg": {"*weight_quantizer": {"num_bits": (4, 3), "axis": None},
                                             "default": {"enable": False}}, "algorithm": "max"})
    assert listed.quant_cfg == legacy.quant_cfg
    bare = recipe_from_dict([{"quantizer_name": "*", "enable": False}])
    assert bare.method == "max" and bare.source == "<dict>"
    full = recipe_from_dict({
        "imports": {"fp8": "configs/numerics/fp8"},
        "metadata": {"recipe_type": "ptq", "description": "d"},
        "quantize": {"quant_cfg": [{"quantizer_name": "*input_quantizer", "cfg": {"$import": "fp8"}}]},
    })
    assert full.quant_cfg[0].cfg.format == "fp8" and full.description == "d"
    assert recipe_from_dict(full) is full
    with pytest.raises(RecipeError, match=r"<dict>: quant_cfg\[0\]\.cfg\.num_bits"):
        recipe_from_dict({"quant_cfg": [{"quantizer_name": "*", "cfg": {"num_bits": "e4m4"}}]})
    assert isinstance(R.preset_recipe("nvfp4", "none"), Recipe)


def test_modelopt_objects_accepted():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    r = recipe_from_dict(mtq.NVFP4_DEFAULT_CFG)
    assert r.quant_cfg[1].cfg.format == "nvfp4"
    ref = load_recipe("general/ptq/nvfp4_default-kv_fp8")
    assert [e for e in ref.quant_cfg if "bmm" not in e.quantizer_name] == list(r.quant_cfg)


def test_round_trip_through_yaml(tmp_path):
    r = load_recipe("general/ptq/fp8_qkvo-nvfp4_mlp")
    p = tmp_path / "dump.yaml"
    p.write_text(r.to_yaml())
    again = load_recipe(p)
    assert again.quant_cfg == r.quant_cfg and again.algorithm == r.algorithm
    assert again.description == r.description
    q = r.quantize_config()
    assert q["quant_cfg"][1] == {"quantizer_name": "*mlp*weight_quantizer",
                                 "cfg": {"num_bits": (2, 1), "block_sizes": {
                                     -1: 16, "type": "dynamic", "scale_bits": (4, 3)},
                                     "effective_bits": 4.5}}


def test_modelopt_recipe_object_accepted():
    mo = pytest.importorskip("modelopt.recipe")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        theirs = mo.load_recipe("general/ptq/fp8_default-kv_fp8")
    r = recipe_from_dict(theirs)
    ours = load_recipe("general/ptq/fp8_default-kv_fp8")
    def canon(entries):
        return [(e.quantizer_name, e.parent_class, e.cfg, e.effective_enable) for e in entries]

    assert r.metadata.recipe_type == "ptq" and canon(r.quant_cfg) == canon(ours.quant_cfg)
