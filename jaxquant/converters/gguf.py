"""GGUF file -> the same ``LoadedModel`` as ``load_hf`` (dequantized; torch-free).

What transformers does for these architectures (its legacy GGUF path,
``modeling_gguf_pytorch_utils.load_gguf_checkpoint``, transformers 5.x), reproduced here so that
``load_gguf(f)`` equals ``load_hf(dir)`` of the directory transformers would write from ``f``:

* Config: the metadata keys of ``transformers.integrations.ggml.GGUF_CONFIG_MAPPING`` renamed to HF
  config keys (``llama.attention.head_count`` -> ``num_attention_heads`` ...);
  ``tie_word_embeddings`` = no ``output.weight`` tensor; ``vocab_size`` from the token list when
  absent; GGUF ``gemma3`` is ``gemma3_text`` (text weights only). Everything else takes the HF
  config class default (Gemma 3: local rope base 1e4, sliding pattern 6, ...).
* Tensor names: gguf-py's ``TensorNameMap`` (``blk.N.attn_q.weight`` <-> ``model.layers.N.self_attn.q_proj.weight``).
* Values: ``gguf.quants.dequantize`` to float32 (Q4_0/Q4_1/Q5_0/Q8_0/K-quants/F16/BF16/F32), then
  * Llama: llama.cpp's converter permuted ``attn_q`` / ``attn_k`` rows to interleave rotary pairs;
    undo it with ``w.reshape(n_head, dim // n_head // 2, 2, ...).swapaxes(1, 2).reshape(w.shape)``,
    with ``n_head`` = query heads for q and KV heads for k (``LlamaTensorProcessor``);
  * Gemma 3: llama.cpp stores every RMSNorm weight as ``w + 1``; subtract 1 in float32
    (``Gemma2TensorProcessor``: every tensor whose name contains ``norm.weight``).
  The float32 result is then cast to the requested dtype, exactly as the safetensors path does.

A GGUF of a Mistral model says ``llama`` (llama.cpp has no Mistral architecture and stores no sliding
window), so it loads as ``LlamaForCausalLM``, which is what llama.cpp computes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxquant.converters.hf import LoadedModel, Sharding, materialize
from jaxquant.converters.names import NameMap
from jaxquant.errors import CheckpointError, UnsupportedError
from jaxquant.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """How one GGUF ``general.architecture`` maps to an HF architecture (data)."""

    hf_architecture: str
    model_type: str
    permute_qk: bool = False  # undo llama.cpp's rotary row permutation of attn_q / attn_k
    norm_minus_one: bool = False  # llama.cpp stored RMSNorm weights as w + 1


GGUF_ARCHITECTURES: dict[str, GgufArch] = {
    "llama": GgufArch("LlamaForCausalLM", "llama", permute_qk=True),
    "qwen2": GgufArch("Qwen2ForCausalLM", "qwen2"),
    "qwen3": GgufArch("Qwen3ForCausalLM", "qwen3"),
    "gemma3": GgufArch("Gemma3ForCausalLM", "gemma3_text", norm_minus_one=True),
}


def _reader(path: Path):
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise UnsupportedError(f"{path}: reading GGUF needs the `gguf` package ({e}).") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct.error / IndexError on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}).") from None


def _field_value(field) -> Any:
    """A metadata field as a Python value (str, int, float, bool, or a list of them)."""
    from gguf import GGUFValueType

    t = field.types
    if not t:
        return None
    if t[0] == GGUFValueType.ARRAY:
        if len(t) > 1 and t[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if t[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    v = field.parts[field.data[0]].tolist()[0]
    return bool(v) if t[0] == GGUFValueType.BOOL else v


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its Python value."""
    r = _reader(Path(path))
    return {k: _field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def gguf_hf_config(path: str | os.PathLike, reader=None) -> dict[str, Any]:
    """The HF ``config.json`` dict transformers builds from a GGUF file's metadata."""
    from jaxquant.transformers_import import TRANSFORMERS_IMPORT

    with TRANSFORMERS_IMPORT:
        from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    path = Path(path)
    r = reader if reader is not None else _reader(path)
    meta = {k: _field_value(f) for k, f in r.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}."
        )
    ga = GGUF_ARCHITECTURES[arch]
    cfg: dict[str, Any] = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(ga.model_type, {}))
    mapping = GGUF_CONFIG_MAPPING.get(arch, {})
    prefix = arch + "."
    for key, value in meta.items():
        if not key.startswith(prefix):
            continue
        hf_key = mapping.get(key[len(prefix):])
        if hf_key is None or hf_key == -1:
            continue
        cfg[hf_key] = value
    cfg["tie_word_embeddings"] = all(t.name != "output.weight" for t in r.tensors)
    if "vocab_size" not in cfg and isinstance(meta.get("tokenizer.ggml.tokens"), list):
        cfg["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[hf_key] = meta[f"tokenizer.ggml.{key}"]
    cfg["architectures"] = [ga.hf_architecture]
    cfg["model_type"] = ga.model_type
    return cfg


class GgufSource:
    """``TensorSource`` over a GGUF file: HF names in, dequantized float32 arrays out."""

    def __init__(self, path: Path, reader, config: ModelConfig, arch: GgufArch, hf_names: list[str]):
        import gguf

        self.path = path
        self.config = config
        self.arch = arch
        self.tensors = {t.name: t for t in reader.tensors}
        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == reader_arch(reader))
        tmap = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
        self.to_gguf: dict[str, str] = {}
        for hf in hf_names:
            base, _, suffix = hf.rpartition(".")
            g = tmap.get_name(base)
            if g is not None and f"{g}.{suffix}" in self.tensors:
                self.to_gguf[hf] = f"{g}.{suffix}"

    def has(self, name):
        return name in self.to_gguf

    def shape(self, name):
        return tuple(int(d) for d in reversed(self.tensors[self.to_gguf[name]].shape.tolist()))

    def dtype(self, name):
        return "F32"  # every supported GGML type dequantizes to float32

    def where(self, name):
        g = self.to_gguf.get(name)
        return f"{self.path} ({g})" if g else str(self.path)

    def get(self, name) -> np.ndarray:
        from gguf.quants import dequantize

        g = self.to_gguf[name]
        t = self.tensors[g]
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {g!r} ({name}) is stored as {t.tensor_type.name}, which the gguf package "
                "cannot dequantize."
            ) from None
        w = np.asarray(w, np.float32).reshape(self.shape(name))
        if self.arch.permute_qk and (".attn_q." in g or ".attn_k." in g):
            n_head = self.config.num_attention_heads if ".attn_q." in g else self.config.num_key_value_heads
            w = _reverse_permute(w, n_head)
        if self.arch.norm_minus_one and "norm.weight" in g:
            w = w - np.float32(1.0)
        return w


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (transformers' ``LlamaTensorProcessor._reverse_permute_weights``)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def reader_arch(reader) -> str:
    return _field_value(reader.fields["general.architecture"])


def load_gguf(path: str | os.PathLike, dtype=jnp.bfloat16, *, sharding: Sharding = None) -> LoadedModel:
    """Load a GGUF file as the same model object ``load_hf`` returns (weights dequantized).

    Raises:
      UnsupportedError: a GGUF architecture without a jaxquant family.
      CheckpointError: unreadable file, missing tensor, shape mismatch, undecodable GGML type.
    """
    from jaxquant.converters.names import param_paths
    from jaxquant.models.decoder import abstract_model

    path = Path(path)
    r = _reader(path)
    hf_config = gguf_hf_config(path, r)
    config = ModelConfig.from_hf_config(hf_config, source=str(path))
    nm = NameMap.for_config(config)
    hf_names = [nm.hf_name(p) for p in param_paths(abstract_model(config, dtype=jnp.float32))]
    source = GgufSource(path, r, config, GGUF_ARCHITECTURES[reader_arch(r)], hf_names)
    model = materialize(config, source, dtype=dtype, name_map=nm, sharding=sharding)
    return LoadedModel(model, config, {}, hf_config, path.parent, nm, gguf_file=path.name)


# ----------------------------------------------------------------------------------------------- tokenizer
def _torch_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ValueError, ImportError):
        return False


def gguf_tokenizer(path: str | os.PathLike):
    """transformers' tokenizer for a GGUF file (as ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``).

    transformers 5 reads GGUF metadata with a module that imports torch; without torch, that reader
    is replaced by one built on the ``gguf`` package (same values) and the tokenizer class is picked
    from the model type as ``AutoTokenizer`` would.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    if _torch_available():
        from jaxquant.transformers_import import auto_tokenizer

        return auto_tokenizer().from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False,
                                             local_files_only=True)
    return _tokenizer_without_torch(path)


def _tokenizer_without_torch(path: Path):
    from jaxquant.transformers_import import TRANSFORMERS_IMPORT

    with TRANSFORMERS_IMPORT:
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

    r = _reader(path)

    def read_gguf_metadata(gguf_path, string_arrays=()):
        meta = {k: _field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
        return meta, tuple(t.name for t in r.tensors)

    name = "transformers.integrations.gguf.reader"
    stub = types.ModuleType(name)
    stub.read_gguf_metadata = read_gguf_metadata
    saved = sys.modules.get(name)
    sys.modules[name] = stub
    try:
        model_type = gguf_hf_config(path, r)["model_type"]
        cls_name = TOKENIZER_MAPPING_NAMES.get(model_type)
        if isinstance(cls_name, tuple):
            cls_name = cls_name[-1] or cls_name[0]
        cls = tokenizer_class_from_name(cls_name) if cls_name else None
        cls = cls or TokenizersBackend
        return cls.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False,
                                   local_files_only=True)
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved
