"""hf_ptq's --kv_cache_qformat vocabulary: every ModelOpt KV preset ships or names what it needs."""



def test_every_modelopt_kv_preset_ships_or_names_what_it_needs():
    from jaxquant.recipe import kv_cache_qformat_choices, preset_recipe
    from jaxquant.recipe.presets import MODELOPT_KV_QFORMATS, PENDING_KV_QFORMATS

    shipped = set(kv_cache_qformat_choices()) - {"none"}
    assert set(MODELOPT_KV_QFORMATS) == shipped | set(PENDING_KV_QFORMATS)
    assert {"fp8_affine", "nvfp4_affine"} <= shipped
    assert "nvfp4_rotate" in shipped and not PENDING_KV_QFORMATS
    assert preset_recipe("fp8", "nvfp4_rotate").quant_cfg[-2].cfg.rotation == (None, False)
