"""A checkpoint's tokenizer: loaded in this process (``load_tokenizer``), or served by a child process.

``load_tokenizer(dir)`` is ``transformers.AutoTokenizer.from_pretrained(dir, trust_remote_code=False,
local_files_only=True)`` after ``refuse_tokenizer_code`` (jaxquant never runs checkpoint code).

Why a child process: importing transformers is about 2.5 s of single-threaded Python, and ``jaxquant ptq`` needs the
tokenizer only after its checkpoint has loaded. Imported on a thread of the command, that import holds the
interpreter lock against the loader's threads and the thread that traces and compiles the calibration, so all
three finish late (probe_ptq_phases.py on an H100 host: the import took 10 s on its thread, and the compilation
thread's recipe step 3.9 s against 0.5 s alone). ``TokenizerProcess`` runs ``load_tokenizer`` in a fresh
interpreter on another core instead, started before JAX is imported; the command's ``RemoteTokenizer`` sends it
texts and gets token ids back as JSON lines (no pickle). It is the same ``AutoTokenizer`` on the same files, so
the ids are the same (tests/converters/test_tokenizer_process.py). Whatever the child cannot do (it fails to start
or to load the tokenizer, an argument that is not plain data, any attribute beyond the special token ids) is done
by a tokenizer loaded in this process, so errors and results are those of ``load_tokenizer``.

The child is used when ``JAXQUANT_TOKENIZER_PROCESS`` is ``1``, or when it is unset, transformers is not imported
yet and the machine has at least ``MIN_CPUS`` cores (on a 2-core machine a second interpreter only competes with
the loader); ``0`` turns it off.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from jaxquant.errors import CheckpointError

log = logging.getLogger("jaxquant")

#: Cores below which ``jaxquant ptq`` keeps the tokenizer in its own process (unless the environment says otherwise).
MIN_CPUS = 8
#: Attributes the child reports once; any other attribute comes from a tokenizer loaded in this process.
ATTRS = ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "name_or_path")

_ENV = "JAXQUANT_TOKENIZER_PROCESS"


# ------------------------------------------------------------------------------------------- in this process
def load_tokenizer(path: str | os.PathLike, *, gguf_file: str | None = None):
    """``transformers.AutoTokenizer`` from a checkpoint directory, or from a GGUF file.

    ``path`` may be the ``.gguf`` file itself. GGUF tokenizers are built from the file's metadata
    (transformers' converter; no torch needed).
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        p, gguf_file = p.parent, p.name
    if gguf_file is not None:
        from jaxquant.converters.gguf import gguf_tokenizer

        return gguf_tokenizer(p / gguf_file)
    refuse_tokenizer_code(p)
    from jaxquant.transformers_import import auto_tokenizer

    return auto_tokenizer().from_pretrained(str(p), trust_remote_code=False, local_files_only=True)


def refuse_tokenizer_code(path: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` when the checkpoint at ``path`` asks for its own Python tokenizer class.

    ``auto_map`` in ``tokenizer_config.json`` (a legacy ``[slow, fast]`` list or an ``AutoTokenizer`` entry) or an
    ``AutoTokenizer`` entry of ``config.json``'s ``auto_map`` names a ``.py`` file of the checkpoint that
    transformers would import (it prompts for it, runs it on "y", and tracebacks without a terminal). jaxquant
    never runs checkpoint code, so it refuses such a checkpoint before transformers sees it.
    """
    d = Path(path)
    for name in ("tokenizer_config.json", "config.json"):
        f = d / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue  # transformers reports an unreadable file itself
        amap = cfg.get("auto_map") if isinstance(cfg, dict) else None
        if isinstance(amap, (list, tuple)) and name == "tokenizer_config.json":
            ref = amap
        elif isinstance(amap, dict):
            ref = amap.get("AutoTokenizer")
        else:
            ref = None
        if not ref:
            continue
        refs = [r for r in (ref if isinstance(ref, (list, tuple)) else [ref]) if r]
        raise CheckpointError(
            f"{f}: \"auto_map\" asks for the tokenizer class {', '.join(map(str, refs)) or ref!r}, Python code "
            "shipped with the checkpoint; jaxquant never runs checkpoint code. Use a tokenizer class transformers "
            f"ships: delete \"auto_map\" from {name} and set \"tokenizer_class\" in tokenizer_config.json to "
            "\"PreTrainedTokenizerFast\" (needs tokenizer.json) or to the model's transformers tokenizer class."
        )


# ------------------------------------------------------------------------------------------- in a child process
def process_wanted() -> bool:
    """Whether ``jaxquant ptq`` should serve its tokenizer from a child process (module doc)."""
    env = os.environ.get(_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return "transformers" not in sys.modules and (os.cpu_count() or 1) >= MIN_CPUS


class TokenizerProcess:
    """A child interpreter that loads ``load_tokenizer(path)`` at once and then tokenizes on request."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        root = str(Path(__file__).resolve().parent.parent)  # the jaxquant this process runs
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from jaxquant.tokenizer import serve; sys.exit(serve(sys.argv[1]))",
             str(self.path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, encoding="utf-8", bufsize=1)
        self._lock = threading.Lock()
        self._hello: dict | None = None

    def ready(self) -> dict | None:
        """Wait for the child's first line: its special token ids when it loaded the tokenizer, else None."""
        with self._lock:
            if self._hello is None:
                self._hello = self._read() or {"ok": False}
            return self._hello if self._hello.get("ok") else None

    def _read(self) -> dict | None:
        try:
            line = self._proc.stdout.readline()
            return json.loads(line) if line else None
        except (OSError, ValueError):
            return None

    def request(self, text: Any, kwargs: dict) -> dict | None:
        """``tokenizer(text, **kwargs)`` in the child as plain lists, or None when the child cannot answer."""
        with self._lock:
            try:
                self._proc.stdin.write(json.dumps({"text": text, "kwargs": kwargs}) + "\n")
                self._proc.stdin.flush()
            except (OSError, ValueError, TypeError):
                return None
            reply = self._read()
        return reply.get("out") if reply and reply.get("ok") else None

    def close(self) -> None:
        """End the child (it also ends by itself when this process exits: its stdin closes)."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()


class RemoteTokenizer:
    """The tokenizer of a ``TokenizerProcess``: calls with plain arguments and the special token ids come from the
    child; anything else from ``load_tokenizer(path)`` in this process, loaded on first need."""

    def __init__(self, proc: TokenizerProcess, attrs: dict):
        self._proc, self._local_tok = proc, None
        for k in ATTRS:
            setattr(self, k, attrs.get(k))

    def _local(self):
        if self._local_tok is None:
            self._local_tok = load_tokenizer(self._proc.path)
        return self._local_tok

    def __call__(self, text, **kwargs):
        if _plain(text) and _plain(kwargs):
            out = self._proc.request(text, kwargs)
            if out is not None:
                return out
        return self._local()(text, **kwargs)

    def __getattr__(self, name):  # only for attributes not set in __init__
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._local(), name)


def tokenizer_via_process(proc: TokenizerProcess):
    """``proc``'s ``RemoteTokenizer`` once the child has loaded it, else ``load_tokenizer`` in this process (whose
    error, if any, is the one the command reports)."""
    hello = proc.ready()
    if hello is None:
        proc.close()
        return load_tokenizer(proc.path)
    return RemoteTokenizer(proc, hello.get("attrs", {}))


def _plain(x) -> bool:
    if x is None or isinstance(x, (str, bool, int, float)):
        return True
    if isinstance(x, (list, tuple)):
        return all(_plain(v) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    return False


def _as_lists(enc) -> dict:
    out = {}
    for k, v in dict(enc).items():
        out[k] = v.tolist() if hasattr(v, "tolist") else v
    return out


def serve(path: str) -> int:
    """The child's main: load the tokenizer, say so on stdout (one JSON line), then answer one JSON line per request
    line on stdin until stdin closes. Anything else the libraries print goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)

    def say(obj) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    from jaxquant.transformers_import import hide_torch

    hide_torch()
    try:
        tok = load_tokenizer(path)
    except BaseException:  # noqa: BLE001 - the parent loads it itself and reports the error
        say({"ok": False})
        return 0
    say({"ok": True, "attrs": {k: getattr(tok, k, None) for k in ATTRS}})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            say({"ok": True, "out": _as_lists(tok(req["text"], **req["kwargs"]))})
        except Exception as e:  # noqa: BLE001 - the parent calls its own tokenizer, which raises it there
            say({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


__all__ = ["RemoteTokenizer", "TokenizerProcess", "load_tokenizer", "process_wanted", "refuse_tokenizer_code",
           "tokenizer_via_process"]
