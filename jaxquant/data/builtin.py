"""Built-in offline text: real English prose read from the installed ``gensim`` wheel's test data.

The project's install step (``pip install --no-deps -r requirements-assets.txt``) installs ``gensim==4.4.0`` without
its dependencies, only for the data files it ships. ``gensim`` is therefore never imported (its dependencies are
absent); the files are located through ``importlib.util.find_spec``. Nothing is downloaded and no corpus text is
stored in this repository.

Datasets:

``lee_news``
    The Lee corpus: Australian ABC news articles, about 2001, one document per line.
    split ``train`` = ``lee_background.cor`` (300 documents, ~60k words), ``test`` = ``lee.cor`` (50),
    ``all`` = both. Research/test use only: read from the installed package, never redistributed.
``wikipedia``
    106 English Wikipedia articles (a shortened 2016 dump; CC BY-SA 3.0), extracted with
    :mod:`jaxquant.data.wikitext` (~440k words). split ``train`` = the first 85 articles in dump order,
    ``test`` = the remaining 21 (~20%, ~95k words), ``all`` = all 106.

Defaults: calibration uses ``lee_news`` (news, like hf_ptq's cnn_dailymail); evaluation uses the held-out
``wikipedia`` ``test`` articles (another source than the calibration text).

The extracted Wikipedia text is cached as JSON under ``$JAXQUANT_CACHE`` (default ``~/.cache/jaxquant``), keyed by
the dump's size and mtime and the extractor version, so repeated runs skip the ~3 s extraction.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

from jaxquant.errors import DataError

GENSIM_VERSION = "4.4.0"
INSTALL_HINT = "pip install --no-deps -r requirements-assets.txt"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_TRAIN_FILE = "lee_background.cor"
LEE_TEST_FILE = "lee.cor"
WIKI_TEST_FRACTION = 0.2

BUILTIN_DATASETS = ("lee_news", "wikipedia")
DEFAULT_CALIB_DATASET = "lee_news"
DEFAULT_EVAL_DATASET = "wikipedia"
DEFAULT_EVAL_SPLIT = "test"
SPLITS = ("train", "test", "all")


def gensim_test_data_dir() -> Path:
    """The ``gensim/test/test_data`` folder of the installed gensim wheel (without importing gensim)."""
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        d = Path(loc) / "test" / "test_data"
        if d.is_dir():
            return d
    raise DataError(
        "The built-in datasets (lee_news, wikipedia) read text shipped inside the gensim package, which is not "
        f"installed. Install it (data only, no dependencies) with `{INSTALL_HINT}` "
        f"(or `pip install --no-deps gensim=={GENSIM_VERSION}`), or pass your own text with --dataset path.jsonl."
    )


def _data_file(name: str) -> Path:
    path = gensim_test_data_dir() / name
    if not path.is_file():
        raise DataError(
            f"{path} is missing from the installed gensim package; reinstall it with "
            f"`pip install --no-deps --force-reinstall gensim=={GENSIM_VERSION}`."
        )
    return path


def cache_dir() -> Path:
    """jaxquant's cache folder: ``$JAXQUANT_CACHE``, else ``$XDG_CACHE_HOME/jaxquant``, else ``~/.cache/jaxquant``."""
    env = os.environ.get("JAXQUANT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxquant"


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def wiki_articles() -> list[tuple[str, str]]:
    """All ``(title, text)`` articles of the built-in Wikipedia dump (extracted once, then cached)."""
    from jaxquant.data.wikitext import EXTRACTOR_VERSION, extract_articles

    src = _data_file(WIKI_FILE)
    st = src.stat()
    key = f"wikipedia-{st.st_size}-{st.st_mtime_ns}-v{EXTRACTOR_VERSION}.json"
    cached = cache_dir() / "builtin" / key
    if cached.is_file():
        try:
            with open(cached, encoding="utf-8") as f:
                data = json.load(f)
            return [(str(t), str(x)) for t, x in data["articles"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # corrupt cache: rebuild it
    articles = extract_articles(str(src))
    _write_cache(cached, {"source": str(src), "articles": articles})
    return articles


def _write_cache(path: Path, obj) -> None:
    """Atomic best-effort write (an unwritable cache folder only costs speed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


def _check_split(name: str, split: str | None) -> str:
    split = "train" if split is None else split
    if split not in SPLITS:
        raise DataError(f"built-in dataset {name!r} has splits {', '.join(SPLITS)}; got split {split!r}.")
    return split


def builtin_texts(name: str, split: str | None = None) -> list[str]:
    """All documents of a built-in dataset split (``None`` = ``train``), in file order."""
    split = _check_split(name, split)
    if name == "lee_news":
        docs: list[str] = []
        if split in ("train", "all"):
            docs += _read_lines(_data_file(LEE_TRAIN_FILE))
        if split in ("test", "all"):
            docs += _read_lines(_data_file(LEE_TEST_FILE))
        return docs
    if name == "wikipedia":
        texts = [text for _title, text in wiki_articles()]
        n_test = int(round(len(texts) * WIKI_TEST_FRACTION))
        if split == "train":
            return texts[: len(texts) - n_test]
        if split == "test":
            return texts[len(texts) - n_test :]
        return texts
    raise DataError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}.")


def is_builtin(name: str) -> bool:
    return name in BUILTIN_DATASETS
