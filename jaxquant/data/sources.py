"""One entry point for every ``--dataset`` spelling: ``load_texts(spec, n, split=...)``.

A spec is a comma-separated list; each item is resolved in this order:

1. ``builtin:<name>`` or a bare built-in name (``lee_news``, ``wikipedia``) -> offline text from the installed gensim
   wheel (:mod:`jaxquant.data.builtin`). The bare name ``wikipedia`` means the built-in articles; write
   ``hf:wikipedia`` for hf_ptq's hub dataset of that name.
2. ``hf:<name or org/repo>`` -> the Hugging Face hub (:mod:`jaxquant.data.hub`).
3. An existing path, or a name with a file extension / path separator -> a local file (:mod:`jaxquant.data.files`);
   an existing directory is handed to ``datasets`` as a local dataset folder.
4. An hf_ptq dataset or combo name (cnn_dailymail, wikitext, c4, pile, pg19, magpie, nemotron-*, cnn_nemotron_v2_mix,
   ...) or an ``org/name`` repo id -> the hub.

Sample counts follow hf_ptq: ``n`` is an int or one count per item; a shorter list is padded with its last value and
a longer one truncated (``--calib_size 512 --dataset a,b`` gives 512 samples of each). A combo's count is split
evenly over its members (remainder to the first members).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from jaxquant.data import builtin, files, hub
from jaxquant.errors import DataError

log = logging.getLogger("jaxquant.data")

BUILTIN_PREFIX = "builtin:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_dataset_spec(spec: str | Sequence[str]) -> list[str]:
    """Split a comma-separated ``--dataset`` value (or accept a list) into stripped, non-empty items."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [s.strip() for s in items if s and s.strip()]
    if not out:
        raise DataError(f"empty --dataset value {spec!r}; name a dataset, a file, or leave it unset for the default.")
    return out


def parse_calib_sizes(sizes: int | str | Sequence[int]) -> list[int]:
    """``1024`` / ``"512,256"`` / ``[512, 256]`` -> a list of ints (validated positive)."""
    if isinstance(sizes, str):
        try:
            vals = [int(s) for s in sizes.split(",") if s.strip()]
        except ValueError:
            raise DataError(f"--calib-size must be an integer or a comma-separated list of integers, got {sizes!r}.")
    elif isinstance(sizes, int):
        vals = [sizes]
    else:
        vals = [int(s) for s in sizes]
    if not vals or any(v <= 0 for v in vals):
        raise DataError(f"--calib-size must be positive (one count per dataset), got {sizes!r}.")
    return vals


def match_calib_sizes(n_datasets: int, sizes: int | str | Sequence[int]) -> list[int]:
    """hf_ptq's rule: pad the count list with its last value, then truncate it to the number of datasets."""
    vals = parse_calib_sizes(sizes)
    return (vals + [vals[-1]] * n_datasets)[:n_datasets]


def _kind(item: str) -> str:
    if item.startswith(BUILTIN_PREFIX) or builtin.is_builtin(item):
        return "builtin"
    if item.startswith(hub.HUB_PREFIX):
        return "hub"
    p = Path(item).expanduser()
    if p.is_dir():
        return "hub"
    if p.exists() or files.file_kind(item) is not None:
        return "file"
    if item in hub.HUB_DATASETS or item in hub.HUB_COMBOS:
        return "hub"
    if _REPO_ID.match(item) and not item.startswith("."):
        return "hub"
    if files.looks_like_path(item):
        return "file"  # reports "does not exist"
    raise DataError(
        f"unknown dataset {item!r}. Use a built-in dataset ({', '.join(builtin.BUILTIN_DATASETS)}), a local "
        f"file ({', '.join(files.SUPPORTED_EXTS)}), an hf_ptq dataset name "
        f"({', '.join(list(hub.HUB_DATASETS) + list(hub.HUB_COMBOS))}) or hf:<org/name>."
    )


def expand_datasets(spec: str | Sequence[str], n: int | str | Sequence[int]) -> list[tuple[str, int]]:
    """``[(item, count)]`` after hf_ptq's count matching and combo expansion."""
    items = parse_dataset_spec(spec)
    counts = match_calib_sizes(len(items), n)
    plain = {i for i in items if i not in hub.HUB_COMBOS}
    out: list[tuple[str, int]] = []
    for item, count in zip(items, counts):
        if item in hub.HUB_COMBOS:
            members = hub.HUB_COMBOS[item]
            overlap = plain & set(members)
            if overlap:
                raise DataError(
                    f"--dataset names the combo {item!r} and its member(s) {sorted(overlap)}; remove one to avoid "
                    "sampling the same data twice."
                )
            base, rem = divmod(count, len(members))
            out += [(m, base + (1 if i < rem else 0)) for i, m in enumerate(members)]
        else:
            out.append((item, count))
    return out


def _load_one(item: str, n: int | None, split: str | None, field: str | None, text_unit: str) -> list[str]:
    kind = _kind(item)
    if kind == "builtin":
        name = item[len(BUILTIN_PREFIX):] if item.startswith(BUILTIN_PREFIX) else item
        texts = builtin.builtin_texts(name, split)
        return texts if n is None else texts[:n]
    if kind == "file":
        return files.load_file_texts(item, n, field=field, text_unit=text_unit)
    if n is None:
        raise DataError(f"dataset {item!r} is streamed from the hub: give a number of samples.")
    return hub.load_hub_texts(item, n, split=split, field=field)


def load_texts(
    spec: str | Sequence[str] | None = None,
    n: int | str | Sequence[int] = 1024,
    split: str | None = None,
    *,
    field: str | None = None,
    text_unit: str = "auto",
    warn_short: bool = True,
) -> list[str]:
    """The first ``n`` non-empty texts of a dataset spec (see the module docstring), in order, no shuffling.

    ``spec`` None -> the built-in calibration default (``lee_news``). ``split`` None -> each dataset's default
    (built-in: ``train``; hub: the registered splits); it does not apply to local files, which are read whole.
    ``field`` names the text column of json / jsonl / parquet / hub records. A dataset that runs out before its
    count gives what it has (logged as a warning unless ``warn_short`` is False); no text at all is a DataError.
    """
    spec = builtin.DEFAULT_CALIB_DATASET if spec is None else spec
    texts: list[str] = []
    for item, count in expand_datasets(spec, n):
        got = _load_one(item, count, split, field, text_unit)
        if warn_short and len(got) < count:
            log.warning("dataset %r has %d non-empty samples, fewer than the %d requested; using all of them.",
                        item, len(got), count)
        texts += got
    if not texts:
        raise DataError(f"dataset {spec!r} gave no text.")
    return texts


def load_eval_text(
    spec: str | None = None,
    split: str | None = builtin.DEFAULT_EVAL_SPLIT,
    *,
    field: str | None = None,
    n_docs: int | None = None,
    text_unit: str = "auto",
) -> str:
    """One evaluation text: the documents of ``spec`` joined with blank lines.

    ``spec`` None -> the built-in held-out Wikipedia articles (``wikipedia``, split ``test``). ``n_docs`` None reads
    every document of a built-in dataset or file; hub datasets need a count (default 2000 documents).
    """
    spec = builtin.DEFAULT_EVAL_DATASET if spec is None else spec
    docs: list[str] = []
    for item in parse_dataset_spec(spec):
        if item in hub.HUB_COMBOS:
            raise DataError(f"{item!r} is a calibration mix; evaluate on one dataset at a time.")
        count = n_docs
        if count is None and _kind(item) == "hub":
            count = 2000
        docs += _load_one(item, count, split, field, text_unit)
    text = "\n\n".join(d.strip() for d in docs if d.strip())
    if not text:
        raise DataError(f"evaluation dataset {spec!r} gave no text.")
    return text
