"""hf_ptq's Hugging Face calibration datasets, read through the optional ``datasets`` library.

``datasets`` is not a jaxquant dependency and the hub is often unreachable (air-gapped machines, CI): every failure
becomes a DataError that says what to use instead (a local file, or the built-in offline text). The environment
variables ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are respected, and reachability is probed with a 3-second TCP
connection before ``datasets`` is asked for anything, so an offline run fails fast instead of hanging in retries.

Sampling is hf_ptq's: streaming, first N, no shuffle; ``N`` is split evenly over the dataset's configured splits
(remainder to the last split); a sample that preprocesses to an empty string counts towards N but is dropped.
The registry below mirrors ModelOpt 0.47's ``SUPPORTED_DATASET_CONFIG`` / ``DATASET_COMBOS``
(``modelopt/torch/utils/dataset_utils.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from jaxquant.data.records import join_turns, record_text
from jaxquant.errors import DataError

HUB_PREFIX = "hf:"
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class HubDataset:
    """Where a registered dataset lives on the hub and which columns make its text (joined with "\\n")."""

    path: str
    name: str | None
    splits: tuple[str, ...]
    columns: tuple[str, ...]
    data_files: str | None = None  # raw-file template ({split} substituted), read as split 'train'


def _msgs(path: str, *splits: str, data_files: str | None = None) -> HubDataset:
    return HubDataset(path, None, splits, ("messages",), data_files)


HUB_DATASETS: dict[str, HubDataset] = {
    "open_code_reasoning": HubDataset("nvidia/OpenCodeReasoning", "split_0", ("split_0",), ("input", "output")),
    "open_math_reasoning": HubDataset(
        "nvidia/OpenMathReasoning", None, ("cot", "tir", "genselect"), ("problem", "generated_solution")
    ),
    "llama-nemotron-post-training-dataset": HubDataset(
        "nvidia/Llama-Nemotron-Post-Training-Dataset", "SFT", ("code", "math", "science", "chat", "safety"),
        ("input", "output"),
    ),
    "nemotron-post-training-dataset-v2": _msgs("nvidia/Nemotron-Post-Training-Dataset-v2", "stem", "chat", "math",
                                               "code"),
    "nemotron-post-training-dataset-v1": _msgs("nvidia/Nemotron-Post-Training-Dataset-v1", "stem", "chat", "math",
                                               "code", "tool_calling"),
    "nemotron-sft-instruction-following-chat-v2": _msgs("nvidia/Nemotron-SFT-Instruction-Following-Chat-v2",
                                                        "reasoning_off"),
    "nemotron-science-v1": _msgs("nvidia/Nemotron-Science-v1", "MCQ", "RQA"),
    "nemotron-competitive-programming-v1": _msgs(
        "nvidia/Nemotron-Competitive-Programming-v1", "competitive_coding_cpp_part00",
        "competitive_coding_cpp_part01", "competitive_coding_python_part00", "competitive_coding_python_part01",
    ),
    "nemotron-sft-agentic-v2": _msgs("nvidia/Nemotron-SFT-Agentic-v2", "search", data_files="data/{split}*.jsonl"),
    "nemotron-math-v2": _msgs("nvidia/Nemotron-Math-v2", "high_part00", "high_part01", "high_part02", "medium",
                              "low"),
    "nemotron-sft-swe-v2": _msgs("nvidia/Nemotron-SFT-SWE-v2", "agentless"),
    "nemotron-sft-multilingual-v1": _msgs(
        "nvidia/Nemotron-SFT-Multilingual-v1",
        *[f"{d}_{lang}" for d in ("code", "math", "stem") for lang in ("de", "es", "fr", "it", "ja", "zh")],
    ),
    "magpie": HubDataset("Magpie-Align/Magpie-Pro-MT-300K-v0.1", None, ("train",), ("conversations",)),
    "cnn_dailymail": HubDataset("abisee/cnn_dailymail", "3.0.0", ("train",), ("article",)),
    "pile": HubDataset("monology/pile-uncopyrighted", "v1.0", ("train",), ("text",)),
    "pg19": HubDataset("pg19", "v1.0", ("train",), ("text",)),
    "wikipedia": HubDataset("wikipedia", "20220301.en", ("train",), ("text",)),
    "c4": HubDataset("c4", "en", ("train",), ("text",)),
    "wikitext": HubDataset("Salesforce/wikitext", "wikitext-103-v1", ("train",), ("text",)),
}

# Named groups: the sample count is split evenly over the members (remainder to the first members).
HUB_COMBOS: dict[str, tuple[str, ...]] = {
    "cnn_nemotron_v2_mix": ("cnn_dailymail", "nemotron-post-training-dataset-v2"),
    "nemotron-post-training-v3": (
        "nemotron-sft-instruction-following-chat-v2", "nemotron-science-v1", "nemotron-competitive-programming-v1",
        "nemotron-sft-agentic-v2", "nemotron-math-v2", "nemotron-sft-swe-v2", "nemotron-sft-multilingual-v1",
    ),
}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _offline_message(name: str, why: str) -> str:
    return (
        f"dataset {name!r} needs the Hugging Face hub, which is not reachable ({why}). Use a local file "
        "(--dataset path.jsonl / .txt / .json / .parquet) or the built-in offline default (--dataset lee_news; "
        "wikipedia is the built-in evaluation text)."
    )


@functools.lru_cache(maxsize=None)
def _probe(host: str, port: int) -> str | None:
    """None when a TCP connection to host:port opens within PROBE_TIMEOUT_S, else the reason.

    Runs in a daemon thread so that a hanging DNS lookup (not covered by the socket timeout) cannot stall the run.
    """
    result: list[str | None] = []

    def attempt():
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port}: {e.strerror or e}")

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(PROBE_TIMEOUT_S + 0.5)
    if not result:
        return f"no answer from {host}:{port} within {PROBE_TIMEOUT_S:.0f} s"
    return result[0]


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be used right now (offline env var or no connection), or None if it looks reachable."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _truthy(os.environ.get(var)):
            return f"offline: {var}={os.environ[var]}"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(target if "://" in target else "http://" + target)
    if not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    reason = _probe(url.hostname, port)
    return f"offline: {reason}" if reason else None


def _require_datasets(name: str):
    if importlib.util.find_spec("datasets") is None:
        raise DataError(
            f"dataset {name!r} is read from the Hugging Face hub with the `datasets` package, which is not "
            "installed (it is not a jaxquant dependency: `pip install datasets`). Without it, use a local file "
            "(--dataset path.jsonl) or the built-in offline default (--dataset lee_news)."
        )
    import datasets

    return datasets


def is_hub_name(spec: str) -> bool:
    """A registered hf_ptq dataset / combo name, or an explicit ``hf:`` spec."""
    return spec.startswith(HUB_PREFIX) or spec in HUB_DATASETS or spec in HUB_COMBOS


def _preprocess(cfg: HubDataset, sample: dict[str, Any], where: str) -> str:
    parts: list[str] = []
    for col in cfg.columns:
        if col not in sample:
            raise DataError(f"{where}: column {col!r} missing (the sample has {sorted(sample)}).")
        value = sample[col]
        parts.append(join_turns(value) if isinstance(value, list) else ("" if value is None else str(value)))
    return "\n".join(parts)


def _split_counts(n: int, k: int) -> list[int]:
    counts = [n // k] * k
    counts[-1] += n - sum(counts)
    return counts


def load_hub_texts(name: str, n: int, split: str | None = None, field: str | None = None) -> list[str]:
    """hf_ptq's first-``n`` streamed samples of a hub dataset (registered name, ``hf:org/name`` or a local
    ``datasets`` folder). ``split`` overrides the registered splits; ``field`` picks the text column."""
    bare = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name
    if bare in HUB_COMBOS:
        raise DataError(f"{bare!r} is a combo of {', '.join(HUB_COMBOS[bare])}; load it through load_texts().")
    if n <= 0:
        return []
    local_dir = os.path.isdir(bare)
    if not local_dir:
        reason = hub_unreachable_reason()
        if reason:
            if importlib.util.find_spec("datasets") is None:
                reason += "; the `datasets` package it is read with is not installed either"
            raise DataError(_offline_message(bare, reason))
    datasets = _require_datasets(bare)

    key = os.path.basename(os.path.normpath(bare)) if local_dir else bare
    cfg = HUB_DATASETS.get(key)
    if cfg is not None and field is None:
        splits = (split,) if split else cfg.splits
        load_kwargs: dict[str, Any] = {"path": bare if local_dir else cfg.path}
        if cfg.name:
            load_kwargs["name"] = cfg.name

        def prep(sample, where):
            return _preprocess(cfg, sample, where)
    else:
        splits = (split or "train",)
        load_kwargs = {"path": bare}

        def prep(sample, where):
            return record_text(sample, field, where=where)

    texts: list[str] = []
    for split_name, count in zip(splits, _split_counts(n, len(splits))):
        if count == 0:
            continue
        where = f"dataset {bare!r} split {split_name!r}"
        try:
            if cfg is not None and cfg.data_files and not local_dir and field is None:
                stream = datasets.load_dataset(
                    cfg.path, data_files=cfg.data_files.format(split=split_name), split="train", streaming=True
                )
            else:
                stream = datasets.load_dataset(**load_kwargs, split=split_name, streaming=True)
            for i, sample in enumerate(stream):
                if i >= count:
                    break
                text = prep(sample, f"{where}, sample {i}")
                if text:
                    texts.append(text)
        except DataError:
            raise
        except Exception as e:  # network, auth, missing config/split: surface as a user error
            raise DataError(
                f"could not read {where} from the Hugging Face hub ({type(e).__name__}: {e}). Check the name, "
                "the split and your access to it, or use a local file (--dataset path.jsonl) or the built-in "
                "offline default (--dataset lee_news)."
            ) from None
    return texts
