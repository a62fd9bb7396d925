"""Turning one dataset record (a JSON object / parquet row / hub sample) into calibration text.

The column detection follows hf_ptq's ``_auto_preprocess_sample`` order, with its chat template left off (hf_ptq's
default): ``messages`` / ``conversations`` -> the turns' ``content`` (or ``value``) joined with "\\n";
``prompt`` (+ ``completion`` / ``response`` / ``output``) joined with "\\n"; ``text``; ``input`` (+ ``output``).
An explicit ``field`` (``--dataset-field`` for ``--dataset``, ``--eval-dataset-field`` for ``--eval-dataset``) overrides
the detection; it may name a string column or a message list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxquant.errors import DataError

AUTO_FIELDS = ("messages", "conversations", "prompt", "text", "input")
FIELD_ADVICE = ("Name the text column with --dataset-field NAME (--eval-dataset-field NAME for --eval-dataset; "
                "field= in the Python API).")


def join_turns(turns: Any) -> str:
    """Join chat turns' ``content`` (OpenAI style) or ``value`` (ShareGPT style) with newlines."""
    parts: list[str] = []
    for turn in turns or []:
        if isinstance(turn, Mapping):
            value = turn.get("content", turn.get("value"))
        else:
            value = turn
        if value is None:
            continue
        if isinstance(value, list):  # multimodal content parts: keep the text parts
            value = "\n".join(str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in value)
        parts.append(str(value))
    return "\n".join(parts)


def _value_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and (not value or isinstance(value[0], Mapping)):
        return join_turns(value)
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def record_text(record: Any, field: str | None = None, *, where: str = "") -> str:
    """The calibration text of one record; raises DataError naming ``where`` when no text column is found."""
    if isinstance(record, str):
        return record
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object or a string, got {type(record).__name__}.")
    if field is not None:
        if field not in record:
            raise DataError(
                f"{where}: field {field!r} not found (the record has {sorted(record)}). " + FIELD_ADVICE
            )
        return _value_text(record[field])

    def has(key: str) -> bool:
        return record.get(key) is not None

    for key in ("messages", "conversations"):
        if has(key):
            return join_turns(record[key])
    if has("prompt"):
        parts = [str(record["prompt"])]
        parts += [str(record[k]) for k in ("completion", "response", "output") if has(k)]
        return "\n".join(parts)
    if has("text"):
        return _value_text(record["text"])
    if has("input"):
        parts = [str(record["input"])]
        if has("output"):
            parts.append(str(record["output"]))
        return "\n".join(parts)
    raise DataError(
        f"{where}: no text column found (the record has {sorted(record)}; looked for "
        f"{', '.join(AUTO_FIELDS)}). " + FIELD_ADVICE
    )
