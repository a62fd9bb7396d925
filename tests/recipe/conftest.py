"""Fixtures for the recipe tests."""

import pytest
from _recipe_oracle import TorchOracle, _tiny_models


@pytest.fixture(scope="session")
def torch_oracles():
    pytest.importorskip("modelopt.torch.quantization")
    import torch
    from modelopt.torch.quantization.conversion import replace_quant_module

    torch.manual_seed(0)
    out = {}
    import contextlib
    import io

    for name, model in _tiny_models().items():
        with contextlib.redirect_stdout(io.StringIO()):
            replace_quant_module(model)
        out[name] = TorchOracle(name, model)
    return out
