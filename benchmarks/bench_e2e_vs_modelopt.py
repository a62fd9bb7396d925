"""End-to-end PTQ, ``jaxquant ptq`` against nvidia-modelopt, on the same random checkpoint and the same token ids.

A script, not a timed test (issue 11). It

1. builds a random-weight checkpoint (``--dtype``, bf16 by default) of a real model's shape with transformers (``save_pretrained``,
   safetensors shards of 5 GB), with a word-level tokenizer whose token ``t<i>`` is id ``i`` and has no special
   tokens, and a calibration file (``calib.jsonl``) of ``--calib-size`` rows of exactly ``--calib-seq`` random
   token ids written as such words: both tools tokenize it to the same id matrix (``ids.npy``; both workers
   check that), with no padding;
2. runs each tool in its own Python process, timed per phase, with its imports:

   * ModelOpt: ``AutoModelForCausalLM.from_pretrained`` onto the device, ``mtq.quantize(model, cfg,
     forward_loop)`` with the recipe's ModelOpt config (``modelopt.recipe.loader.load_recipe``; a recipe
     ModelOpt does not ship is read from jaxquant's YAML, which ModelOpt's loader parses), then
     ``export_hf_checkpoint``; peak device memory is ``torch.cuda.max_memory_allocated``;
   * jaxquant: the ``jaxquant ptq`` command itself (``jaxquant.cli.main``, in process so that the peak device
     memory, ``memory_stats()["peak_bytes_in_use"]``, can be read at the end) with ``--eval-windows 0``; its
     phases are the command's own phase table;

3. compares the two exports: tensor names, the fraction of identical bytes of the weight side (packed weights,
   ``weight_scale``, ``weight_scale_2``, unquantized tensors), the largest relative difference of every
   activation scale (``input_scale``, ``k_scale``, ``v_scale``), and ``hf_quant_config.json`` (``producer`` left
   out);
4. prints a table and writes JSON (``--out DIR``: ``DIR/bench_e2e_<shape>.json``).

    python benchmarks/bench_e2e_vs_modelopt.py --shape llama8b --recipe general/ptq/fp8_qkvo-nvfp4_mlp \\
        --calib-size 512 --calib-seq 512 --batch-size 16 --out results/
    python benchmarks/bench_e2e_vs_modelopt.py --shape gemma4-31b:12 ...     # 12 of Gemma-4-31B's 60 layers
    python benchmarks/bench_e2e_vs_modelopt.py --shape tiny --calib-size 8 --calib-seq 32 --batch-size 4 \\
        --out /tmp/r                                                         # seconds, on CPU

Several ``--recipe`` values run one after the other on the same checkpoint. ``--jaxquant-src DIR`` puts DIR
first on the jaxquant process's ``PYTHONPATH`` (a ``git archive`` of one commit, so that the numbers belong to
that commit and not to a working tree others are editing). ``--timeout`` bounds each tool's process, ``--budget``
the whole script (what is left goes to the next process; a killed one is reported as such).
Times are wall-clock seconds; "calibrate" is everything between the loaded model and the export (recipe,
calibration data, compile, forward passes, finalize); the token rate counts the forward passes alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_SLIDING = {"rope_type": "default", "rope_theta": 10000.0}
_FULL = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}

# name -> (transformers config class, model class, config kwargs)
SHAPES: dict[str, tuple[str, str, dict]] = {
    # Llama-3.1-8B (hub config.json; plain RoPE instead of the llama3 scaling, which no 512-token run reaches)
    "llama8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=128000,
        eos_token_id=128001)),
    # Llama-3.1-70B (hub config.json; plain RoPE as above): 141 GB in bf16, more than one H100/H200 holds
    "llama70b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=128000,
        eos_token_id=128001)),
    # Gemma-4-31B text config (docs/moe.md): 5 sliding + 1 full layer repeated; ":N" keeps the first N layers
    "gemma4-31b": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32,
        num_key_value_heads=16, head_dim=256, global_head_dim=512, num_global_key_value_heads=4,
        attention_k_eq_v=True, sliding_window=1024, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, tie_word_embeddings=True, max_position_embeddings=262144,
        rope_parameters={"sliding_attention": _SLIDING, "full_attention": _FULL}, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)),
    # CPU smoke sizes
    "tiny": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=1)),
    "tiny-gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=128, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, tie_word_embeddings=True, max_position_embeddings=512,
        rope_parameters={"sliding_attention": _SLIDING, "full_attention": _FULL}, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)),
}
_GEMMA4_PATTERN = ["sliding_attention"] * 5 + ["full_attention"]

ACT_SCALES = (".input_scale", ".k_scale", ".v_scale")


def shape_config(spec: str) -> tuple[str, str, dict]:
    """``llama8b`` / ``llama70b`` / ``gemma4-31b:N`` / ``tiny`` / ``tiny-gemma4`` -> (config class, model class, kwargs)."""
    name, _, n = spec.partition(":")
    if name not in SHAPES:
        raise SystemExit(f"error: --shape {spec!r}: one of {', '.join(SHAPES)} (gemma4-31b:N for N layers)")
    cfg_cls, model_cls, kw = SHAPES[name]
    kw = dict(kw)
    if n:
        kw["num_hidden_layers"] = int(n)
    if cfg_cls == "Gemma4TextConfig":
        L = kw["num_hidden_layers"]
        pattern = _GEMMA4_PATTERN if name == "gemma4-31b" else ["sliding_attention", "full_attention"]
        kw["layer_types"] = (pattern * (L // len(pattern) + 1))[:L]
    return cfg_cls, model_cls, kw


def _accelerator() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


# ----------------------------------------------------------------------------------------------- step 1: inputs
def build_inputs(args, work: Path) -> dict:
    """The random checkpoint (``work/src``) and calibration set (``work/calib.jsonl``, ``work/ids.npy``)."""
    import numpy as np
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg_cls, model_cls, kw = shape_config(args.shape)
    src = work / "src"
    t0 = time.perf_counter()
    device = _accelerator()
    torch.manual_seed(args.seed)
    config = getattr(transformers, cfg_cls)(**kw)
    dtype = getattr(torch, args.dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, model_cls)(config).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # non-trivial norms (Llama's start at 1, Gemma 4's at 1)
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    model = model.to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(src), max_shard_size="5GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 30).save_pretrained(str(src))

    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, config.vocab_size, (args.calib_size, args.calib_seq), dtype=np.int64).astype(np.int32)
    np.save(work / "ids.npy", ids)
    with open(work / "calib.jsonl", "w") as f:
        for row in ids:
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in row)}) + "\n")
    return {"seconds": time.perf_counter() - t0, "parameters": int(n_params),
            "checkpoint_bytes": _dir_bytes(src), "device": device}


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


def _token_ids(tokenizer, jsonl: Path, calib_seq: int):
    """The calibration file tokenized as ``jaxquant ptq`` does (truncation at calib_seq, no padding needed)."""
    import numpy as np

    with open(jsonl) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    enc = tokenizer(texts, padding=False, truncation=True, max_length=calib_seq)["input_ids"]
    return np.asarray(enc, dtype=np.int32)


# ----------------------------------------------------------------------------------------------- step 2: workers
def worker_modelopt(args, t_start: float) -> dict:
    """One ModelOpt PTQ run; returns phases (s), tokens/s, peak device memory, export bytes."""
    phases = {}
    import numpy as np
    import torch
    import transformers
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.init()
        torch.zeros(1, device="cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases["import"] = time.perf_counter() - t_start
    work = Path(args.work)

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(work / "src"), dtype=getattr(torch, args.dtype),
                                                              device_map=device).eval()
    sync()
    phases["load model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg, recipe_source = modelopt_config(args.recipe)
    phases["recipe"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(work / "src"))
    ids = _token_ids(tokenizer, work / "calib.jsonl", args.calib_seq)
    if not np.array_equal(ids, np.load(work / "ids.npy")):
        raise SystemExit("error: ModelOpt's tokenization differs from ids.npy")
    ids_t = torch.from_numpy(ids.astype(np.int64)).to(device)
    mask_t = torch.ones_like(ids_t)
    phases["load calibration data"] = time.perf_counter() - t0

    fwd = {"s": 0.0}

    def forward_loop(m):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, ids_t.shape[0], args.batch_size):
                m(input_ids=ids_t[i:i + args.batch_size], attention_mask=mask_t[i:i + args.batch_size])
        sync()
        fwd["s"] += time.perf_counter() - t

    t0 = time.perf_counter()
    mtq.quantize(model, cfg, forward_loop=forward_loop)
    sync()
    q = time.perf_counter() - t0
    phases["calibrate: forward passes"] = fwd["s"]
    phases["calibrate: rest of mtq.quantize"] = q - fwd["s"]

    t0 = time.perf_counter()
    out = work / "modelopt"
    export_hf_checkpoint(model, dtype=getattr(torch, args.dtype), export_dir=str(out))
    sync()
    phases["export"] = time.perf_counter() - t0
    import modelopt

    return {"phases": phases, "forward_s": fwd["s"], "export_s": phases["export"], "export_dir": str(out),
            "peak_device_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "recipe_source": recipe_source,
            "versions": {"modelopt": modelopt.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def modelopt_config(recipe: str) -> tuple[dict, str]:
    """ModelOpt's ``{"quant_cfg", "algorithm"}`` for a recipe name: ModelOpt's own recipe, else jaxquant's YAML."""
    import contextlib
    import importlib.util
    import io

    from modelopt.recipe.loader import load_recipe

    source = recipe
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            q = load_recipe(recipe).quantize
    except (ValueError, FileNotFoundError):
        spec = importlib.util.find_spec("jaxquant_recipes")
        if spec is None or spec.origin is None:
            raise
        source = str(Path(spec.origin).parent / f"{recipe}.yaml")
        with contextlib.redirect_stdout(io.StringIO()):
            q = load_recipe(source).quantize
    q = q.model_dump() if hasattr(q, "model_dump") else dict(q)
    return {"quant_cfg": q["quant_cfg"], "algorithm": q.get("algorithm", "max")}, source


def worker_jaxquant(args, t_start: float) -> dict:
    """One ``jaxquant ptq`` run (in process); returns phases (s), peak device memory, export bytes."""
    from jaxquant import cli
    from jaxquant.numerics._exact import with_ieee_gpu_division
    from jaxquant.transformers_import import hide_torch

    hide_torch()  # what the `jaxquant` command does first (console_main)
    os.environ["XLA_FLAGS"] = with_ieee_gpu_division(os.environ.get("XLA_FLAGS", ""))
    phases: dict[str, float] = {}
    recorded: list[tuple[str, float]] = []
    marks: dict[str, float] = {}

    def imported():  # cli.main has imported the runtime (and started the tokenizer's process), as the command does
        from jaxquant import cli_ptq

        marks["imported"] = time.perf_counter()
        phases["import"] = marks["imported"] - t_start
        add = cli_ptq.Timer.add

        def recording_add(self, name, seconds):
            recorded.append((name, float(seconds)))
            return add(self, name, seconds)

        cli_ptq.Timer.add = recording_add

    work = Path(args.work)
    out = work / "jaxquant"
    argv = ["ptq", "--model", str(work / "src"), "--recipe", args.recipe, "--dataset", str(work / "calib.jsonl"),
            "--dataset-field", "text", "--calib-size", str(args.calib_size), "--calib-seq", str(args.calib_seq),
            "--batch-size", str(args.batch_size), "--eval-windows", "0", "--dtype", args.dtype,
            "--export-path", str(out), "--quiet",
            "--compile-cache", str(work / "xla-cache")]  # a fresh, empty cache: a first run's compile times
    rc = cli.main(argv, on_imported=imported)
    main_s = time.perf_counter() - marks.get("imported", t_start)
    if rc != 0:
        raise SystemExit(f"error: jaxquant ptq exited with {rc}")
    import jax

    import jaxquant

    dev = jax.devices()[0]
    for name, s in recorded:
        phases[name] = phases.get(name, 0.0) + s
    phases["command overhead (untimed by the command)"] = main_s - sum(s for _, s in recorded)
    stats = dev.memory_stats() or {}
    fwd = dict(recorded).get("calibrate: forward passes")
    return {"phases": phases, "forward_s": fwd, "export_s": dict(recorded).get("export"), "export_dir": str(out),
            "peak_device_bytes": stats.get("peak_bytes_in_use"), "device": dev.device_kind,
            "jaxquant_file": jaxquant.__file__, "command": "jaxquant " + " ".join(argv),
            "versions": {"jaxquant": getattr(jaxquant, "__version__", "?"), "jax": jax.__version__,
                         "transformers": __import__("transformers").__version__}}


# ----------------------------------------------------------------------------------------------- step 3: compare
_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I32": "<i4", "I64": "<i8", "U8": "u1", "I8": "i1",
              "BF16": "bf16", "F8_E4M3": "u1", "U16": "<u2"}


def _safetensors_index(d: Path) -> dict:
    """name -> (file, dtype, shape, start, end) of every tensor in a directory's .safetensors files."""
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        base = 8 + n
        for k, v in header.items():
            if k == "__metadata__":
                continue
            s, e = v["data_offsets"]
            out[k] = (f, v["dtype"], tuple(v["shape"]), base + s, base + e)
    return out


def _raw(entry):
    import numpy as np

    f, _, _, s, e = entry
    return np.memmap(f, dtype=np.uint8, mode="r", offset=s, shape=(e - s,)) if e > s else np.zeros(0, np.uint8)


def _as_float(entry):
    import numpy as np

    dt = entry[1]
    raw = np.asarray(_raw(entry))
    if dt == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if dt in ("F32", "F16", "F64"):
        return raw.view(_ST_DTYPES[dt]).astype(np.float64)
    raise ValueError(f"not a float scale dtype: {dt}")


def compare_exports(mo_dir: Path, jq_dir: Path) -> dict:
    """Byte comparison of two exported checkpoints (ModelOpt's is the reference)."""
    import numpy as np

    a, b = _safetensors_index(mo_dir), _safetensors_index(jq_dir)
    common = sorted(set(a) & set(b))
    weight_bytes = weight_same = 0
    tensors_identical = weight_tensors = 0
    mismatched = []
    worst_scale = {}
    by_kind: dict[str, dict] = {}
    for k in common:
        ea, eb = a[k], b[k]
        if k.endswith(ACT_SCALES):
            kind = k.rsplit(".", 1)[1]
            if ea[1:3] != eb[1:3]:
                mismatched.append(k)
                continue
            va, vb = _as_float(ea), _as_float(eb)
            rel = float(np.max(np.abs(va - vb) / np.maximum(np.abs(va), 1e-30))) if va.size else 0.0
            w = worst_scale.setdefault(kind, {"max_rel_diff": -1.0, "tensor": None, "count": 0})
            w["count"] += 1
            if rel > w["max_rel_diff"]:
                w.update(max_rel_diff=rel, tensor=k)
            continue
        weight_tensors += 1
        if ea[1:3] != eb[1:3]:
            mismatched.append(k)
            weight_bytes += ea[4] - ea[3]
            continue
        ra, rb = _raw(ea), _raw(eb)
        same = 0
        step = 1 << 28
        for i in range(0, ra.size, step):
            same += int(np.count_nonzero(ra[i:i + step] == rb[i:i + step]))
        weight_bytes += ra.size
        weight_same += same
        tensors_identical += same == ra.size
        kind = by_kind.setdefault(re.sub(r"\.\d+\.", ".*.", k), {"tensors": 0, "tensors_identical": 0, "bytes": 0,
                                                                 "differing_bytes": 0})
        kind["tensors"] += 1
        kind["tensors_identical"] += same == ra.size
        kind["bytes"] += int(ra.size)
        kind["differing_bytes"] += int(ra.size - same)
    qa, qb = _json(mo_dir / "hf_quant_config.json"), _json(jq_dir / "hf_quant_config.json")
    for q in (qa, qb):
        if isinstance(q, dict):
            q.pop("producer", None)
    return {
        "tensors_modelopt": len(a), "tensors_jaxquant": len(b),
        "only_in_modelopt": sorted(set(a) - set(b))[:20], "only_in_jaxquant": sorted(set(b) - set(a))[:20],
        "n_only_in_modelopt": len(set(a) - set(b)), "n_only_in_jaxquant": len(set(b) - set(a)),
        "dtype_or_shape_mismatch": mismatched[:20],
        "weight_side": {"tensors": weight_tensors, "tensors_identical": tensors_identical, "bytes": int(weight_bytes),
                        "identical_bytes_fraction": weight_same / weight_bytes if weight_bytes else None,
                        "by_name": by_kind},
        "activation_scales": worst_scale,
        "hf_quant_config_equal": qa == qb and qa is not None,
        "hf_quant_config": {"modelopt": qa, "jaxquant": qb} if qa != qb else qa,
    }


def _json(p: Path):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------- orchestration
def _run_worker(tool: str, args, recipe_dir: Path, env: dict, timeout: float | None) -> dict:
    """Run one tool's worker process; its wall time with imports, its report, or its error."""
    result = recipe_dir / f"{tool}.json"
    log = recipe_dir / f"{tool}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--work", str(recipe_dir),
           "--recipe", args.recipe_one, "--calib-size", str(args.calib_size), "--calib-seq", str(args.calib_seq),
           "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--result", str(result)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                  check=False)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"killed after {timeout:.0f} s (timeout)"
    wall = time.perf_counter() - t0
    tail = log.read_text(errors="replace")[-3000:]
    if rc != 0 or not result.is_file():
        print(f"{tool}: failed ({rc}); log tail:\n{tail}", file=sys.stderr)
        return {"ok": False, "returncode": rc, "process_wall_s": wall, "log_tail": tail}
    rep = json.loads(result.read_text())
    rep.update(ok=True, process_wall_s=wall, log_tail=tail if tool == "jaxquant" else tail[-1500:])
    tokens = args.calib_size * args.calib_seq
    if rep.get("forward_s"):
        rep["calib_tokens_per_s"] = tokens / rep["forward_s"]
    exp = Path(rep["export_dir"])
    rep["export_bytes"] = _dir_bytes(exp)
    if rep.get("export_s"):
        rep["export_gb_per_s"] = rep["export_bytes"] / rep["export_s"] / 1e9
    return rep


def _summary(rep: dict) -> dict:
    """import / load / calibrate / export / other from a worker's phases."""
    ph = rep["phases"]
    imp = ph.get("import", 0.0)
    load = ph.get("load model", 0.0)
    exp = ph.get("export", 0.0)
    cal = sum(v for k, v in ph.items() if k in ("recipe", "apply recipe", "load calibration data")
              or k.startswith("calibrate"))
    return {"import": imp, "load": load, "calibrate": cal, "export": exp,
            "other": rep["process_wall_s"] - imp - load - cal - exp, "total": rep["process_wall_s"]}


def _fmt_table(rows: list[tuple], head: tuple) -> str:
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i])  # noqa: E731
                                       for i, c in enumerate(r)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) if i == 0 else "-" * (x + 1) + ":"
                                                for i, x in enumerate(w)) + "|", *map(line, rows)])


def table(entry: dict) -> str:
    mo, jq = entry["modelopt"], entry["jaxquant"]
    rows = []
    if mo.get("ok") and jq.get("ok"):
        sm, sj = _summary(mo), _summary(jq)
        for k in ("import", "load", "calibrate", "export", "other", "total"):
            ratio = sj[k] / sm[k] if sm[k] > 0 else float("nan")
            rows.append((k if k != "total" else "**process wall**", f"{sm[k]:.1f} s", f"{sj[k]:.1f} s",
                         f"{ratio:.2f}x"))
    else:
        for name, r in (("modelopt", mo), ("jaxquant", jq)):
            state = "ok" if r.get("ok") else (f"skipped ({r['skipped']})" if r.get("skipped") else
                                               f"FAILED ({r.get('returncode')})")
            rows.append((f"{name} process wall", f"{r['process_wall_s']:.1f} s", state, ""))
        return _fmt_table(rows, ("", "", "", ""))

    def fmt(x, unit, scale=1.0, nd=1):
        return "-" if x is None else f"{x / scale:.{nd}f} {unit}"

    rows.append(("calibration forward tok/s", fmt(mo.get("calib_tokens_per_s"), "k", 1e3),
                 fmt(jq.get("calib_tokens_per_s"), "k", 1e3), ""))
    rows.append(("peak device memory", fmt(mo.get("peak_device_bytes"), "GiB", 2**30),
                 fmt(jq.get("peak_device_bytes"), "GiB", 2**30),
                 f"{jq['peak_device_bytes'] / mo['peak_device_bytes']:.2f}x"
                 if mo.get("peak_device_bytes") and jq.get("peak_device_bytes") else ""))
    rows.append(("export written", fmt(mo.get("export_bytes"), "GB", 1e9, 2), fmt(jq.get("export_bytes"), "GB", 1e9, 2),
                 ""))
    rows.append(("export GB/s written", fmt(mo.get("export_gb_per_s"), "", 1, 2), fmt(jq.get("export_gb_per_s"), "", 1, 2),
                 ""))
    cmp_ = entry.get("compare") or {}
    ws = cmp_.get("weight_side", {})
    if ws:
        frac = ws.get("identical_bytes_fraction")
        rows.append(("weight side identical bytes", "", f"{100 * frac:.4f} %" if frac is not None else "-",
                     f"{ws['tensors_identical']}/{ws['tensors']} tensors"))
        for name, v in sorted(ws.get("by_name", {}).items()):
            if v["differing_bytes"]:
                rows.append((f"  differing: {name}", "", f"{100 * v['differing_bytes'] / v['bytes']:.4f} % of bytes",
                             f"{v['tensors'] - v['tensors_identical']}/{v['tensors']} tensors"))
    for kind, v in sorted(cmp_.get("activation_scales", {}).items()):
        rows.append((f"{kind} max rel diff", "", f"{v['max_rel_diff']:.3g}", f"{v['count']} tensors"))
    if cmp_:
        rows.append(("hf_quant_config.json equal", "", str(cmp_.get("hf_quant_config_equal")), ""))
        if cmp_.get("n_only_in_modelopt") or cmp_.get("n_only_in_jaxquant"):
            rows.append(("tensor names only in one", str(cmp_["n_only_in_modelopt"]), str(cmp_["n_only_in_jaxquant"]),
                         ""))
    return _fmt_table(rows, ("phase", "ModelOpt", "jaxquant", "jaxquant / ModelOpt"))


def _git_commit() -> str | None:
    try:
        h = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10, check=False)
        return h.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama8b", help="llama8b, gemma4-31b:N (N of its 60 layers), tiny, tiny-gemma4")
    p.add_argument("--recipe", nargs="+", default=["general/ptq/fp8_qkvo-nvfp4_mlp"],
                   help="one or more recipe names (run one after the other on the same checkpoint)")
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--calib-seq", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="scratch folder for the checkpoint and exports (default: a new "
                                                "temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the exports")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each tool's process")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole script: a tool's process is given what is left (less 20 s) and "
                        "not started with under 30 s left")
    p.add_argument("--tools", default="modelopt,jaxquant", help="which tools to run (comma list)")
    p.add_argument("--jaxquant-src", default=None,
                   help="a folder put first on the jaxquant process's PYTHONPATH (jaxquant + jaxquant_recipes)")
    p.add_argument("--commit", default=None, help="the jaxquant commit measured (default: git rev-parse HEAD)")
    p.add_argument("--out", default=None, help="write the JSON report into this folder")
    p.add_argument("--worker", choices=["build", "modelopt", "jaxquant"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    t_begin = time.perf_counter()
    if args.worker:
        t_start = time.perf_counter()
        args.recipe = args.recipe[0]
        if args.worker == "build":
            rep = build_inputs(args, Path(args.work))
        else:
            fn = worker_modelopt if args.worker == "modelopt" else worker_jaxquant
            rep = fn(args, t_start)
        Path(args.result).write_text(json.dumps(rep, indent=2))
        if args.worker == "jaxquant":  # leave as the `jaxquant` command does (cli.console_main: os._exit)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return None

    tools = [t for t in args.tools.split(",") if t]
    import importlib.util

    needs = ["torch", "transformers"] + (["modelopt"] if "modelopt" in tools else [])
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"error: needs {', '.join(missing)} (pip install torch transformers nvidia-modelopt)")
    shape_config(args.shape)  # validate before any work
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    commit = args.commit
    if commit is None and args.jaxquant_src and (Path(args.jaxquant_src) / "COMMIT").is_file():
        commit = (Path(args.jaxquant_src) / "COMMIT").read_text().strip()
    commit = commit or _git_commit()
    report = {"shape": args.shape, "config": shape_config(args.shape)[2], "calib_size": args.calib_size,
              "calib_seq": args.calib_seq, "batch_size": args.batch_size, "dtype": args.dtype,
              "jaxquant_commit": commit, "python": platform.python_version(), "host": platform.node(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    try:
        print(f"building {args.shape} checkpoint + {args.calib_size} x {args.calib_seq} token ids in {work} ...",
              flush=True)
        # in its own process, so that this one never holds the accelerator while the tools run
        res = work / "inputs.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "build", "--work", str(work),
               "--shape", args.shape, "--calib-size", str(args.calib_size), "--calib-seq", str(args.calib_seq),
               "--dtype", args.dtype, "--seed", str(args.seed), "--result", str(res)]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise SystemExit("error: building the checkpoint failed")
        report["inputs"] = json.loads(res.read_text())
        print(f"  {report['inputs']['parameters'] / 1e9:.2f} B parameters, "
              f"{report['inputs']['checkpoint_bytes'] / 1e9:.2f} GB, {report['inputs']['seconds']:.1f} s", flush=True)
        base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        jq_env = dict(base_env)
        if args.jaxquant_src:
            src = str(Path(args.jaxquant_src).resolve())
            jq_env["PYTHONPATH"] = os.pathsep.join(x for x in (src, os.environ.get("PYTHONPATH")) if x)
            base_env = dict(jq_env)  # ModelOpt reads jaxquant's recipe YAMLs from the same place
        for recipe in args.recipe:
            args.recipe_one = recipe
            rdir = work / recipe.replace("/", "_")
            rdir.mkdir(exist_ok=True)
            for name in ("src", "calib.jsonl", "ids.npy"):
                if not (rdir / name).exists():
                    (rdir / name).symlink_to(work / name)
            entry = {"recipe": recipe}
            for tool in ("modelopt", "jaxquant"):
                if tool in tools:
                    timeout = args.timeout
                    if args.budget is not None:
                        left = args.budget - (time.perf_counter() - t_begin) - 20.0  # 20 s for compare + JSON
                        if left < 30.0:
                            print(f"[{recipe}] {tool}: skipped, --budget {args.budget:.0f} s spent", flush=True)
                            entry[tool] = {"ok": False, "skipped": "budget spent", "process_wall_s": 0.0}
                            continue
                        timeout = left if timeout is None else min(timeout, left)
                    print(f"[{recipe}] {tool} ...", flush=True)
                    entry[tool] = _run_worker(tool, args, rdir, jq_env if tool == "jaxquant" else base_env, timeout)
                    if tool == "jaxquant" and entry[tool].get("ok"):  # same tokens as ModelOpt's (outside the timing)
                        import numpy as np

                        tok = __import__("transformers").AutoTokenizer.from_pretrained(str(work / "src"))
                        if not np.array_equal(_token_ids(tok, work / "calib.jsonl", args.calib_seq),
                                              np.load(work / "ids.npy")):
                            raise SystemExit("error: the checkpoint's tokenizer gives other ids than ids.npy")
                    print(f"[{recipe}] {tool}: {entry[tool]['process_wall_s']:.1f} s "
                          f"({'ok' if entry[tool].get('ok') else 'failed'})", flush=True)
            if entry.get("modelopt", {}).get("ok") and entry.get("jaxquant", {}).get("ok"):
                t0 = time.perf_counter()
                entry["compare"] = compare_exports(rdir / "modelopt", rdir / "jaxquant")
                entry["compare"]["seconds"] = time.perf_counter() - t0
            if not args.keep:
                for tool in ("modelopt", "jaxquant"):
                    shutil.rmtree(rdir / tool, ignore_errors=True)
            report["runs"].append(entry)
            if "modelopt" in entry and "jaxquant" in entry:
                print(f"\n{args.shape}, {recipe}, {args.calib_size} x {args.calib_seq}, batch {args.batch_size}, "
                      f"jaxquant {commit}")
                print(table(entry), flush=True)
            if args.out:
                _write(report, args)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        _write(report, args, say=True)
    return report


def _write(report: dict, args, say: bool = False) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_e2e_{args.shape.replace(':', '-')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    if say:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
