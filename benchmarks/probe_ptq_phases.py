"""Where the time of one ``jaxquant ptq`` job goes, finer than the command's phase table (a probe, not a benchmark).

    python benchmarks/probe_ptq_phases.py --work /tmp/e2e/general_ptq_fp8_qkvo-nvfp4_mlp [--build llama8b]

Prints, for the checkpoint in ``WORK/src`` (``--build SHAPE`` makes one with ``bench_e2e_vs_modelopt.build_inputs``):
cold import times (fresh processes), loading variants (GB/s), trace / lower / compile seconds of the calibration
step and of one decoder layer, and a cProfile of the export.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def cold_imports():
    snippets = {
        "python": "pass",
        "import jax": "import jax",
        "import jax + devices()": "import jax; jax.devices()",
        "import transformers": "import transformers",
        "import jaxquant.cli_ptq": "import jaxquant.cli_ptq",
        "jaxquant.cli _import_runtime + devices": "from jaxquant import cli; cli._import_runtime(); import jax; jax.devices()",
        "import transformers.AutoTokenizer": "from transformers import AutoTokenizer",
    }
    for label, code in snippets.items():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {"PYTHONPATH": str(HERE.parent)})
        print(f"cold {label:<45} {time.perf_counter() - t0:6.2f} s", flush=True)


def load_variant(src, variant):
    """Read every tensor of ``src`` onto the device one way, in a fresh process (cold mmap, warm page cache)."""
    from concurrent.futures import ThreadPoolExecutor

    import jax
    import numpy as np

    from jaxquant.io.safetensors import CheckpointFiles

    jax.devices()
    files = CheckpointFiles.open(src)
    names = files.keys()
    total = sum(files.tensor_info(n).end - files.tensor_info(n).begin for n in names)

    def view_put(n):
        x = jax.device_put(files.get(n))
        x.block_until_ready()
        return x

    def pread_put(n):
        f = files.name_to_file[n]
        info = f.tensor_info(n)
        buf = np.empty(info.end - info.begin, np.uint8)
        with open(f.path, "rb", buffering=0) as fh:
            fh.seek(f._data_start + info.begin)
            fh.readinto(memoryview(buf))
        x = jax.device_put(buf.view(files.get(n).dtype).reshape(info.shape))
        x.block_until_ready()
        return x

    dev = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    on_device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")

    def pinned_put(n):
        h = jax.device_put(files.get(n), pinned)  # host memcpy into pinned memory
        x = jax.device_put(h, on_device)  # DMA
        x.block_until_ready()
        return x

    t0 = time.perf_counter()
    if variant == "batched":
        xs = jax.device_put([files.get(n) for n in names])
        jax.block_until_ready(xs)
    else:
        workers, kind = variant.split("-")
        fn = {"view": view_put, "pread": pread_put, "pinned": pinned_put}[kind]
        with ThreadPoolExecutor(1 if workers == "serial" else int(workers)) as ex:
            xs = list(ex.map(fn, names))
    dt = time.perf_counter() - t0
    print(f"load {variant:<12} {dt:6.2f} s  {total / dt / 1e9:6.2f} GB/s", flush=True)


#: Prepended to every job: logs (to stderr) when each overlapped piece of work starts and ends, in seconds since
#: the process started, so the critical path of the "load model" phase can be read off.
_JOB_TRACE = (
    "import time, sys, functools, threading\n"
    "T0 = time.perf_counter()\n"
    "from jaxquant.transformers_import import hide_torch\n"
    "hide_torch()  # what console_main does first, before the imports below\n"
    "def _traced(mod, name):\n"
    "    import importlib\n"
    "    m = importlib.import_module(mod)\n"
    "    fn = getattr(m, name)\n"
    "    @functools.wraps(fn)\n"
    "    def w(*a, **k):\n"
    "        t = time.perf_counter()\n"
    "        try:\n"
    "            return fn(*a, **k)\n"
    "        finally:\n"
    "            import jax\n"
    "            peak = (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use', 0) / 2**30\n"
    "            print(f'TRACE {name:<28} {threading.current_thread().name:<24} start {t - T0:6.2f} end '\n"
    "                  f'{time.perf_counter() - T0:6.2f} peak {peak:5.2f} GiB', file=sys.stderr, flush=True)\n"
    "    setattr(m, name, w)\n"
    "for _m, _n in [('jaxquant.transformers_import', 'auto_tokenizer'), ('jaxquant.converters.hf', 'load_tokenizer'),\n"
    "               ('jaxquant.converters.hf', 'materialize'), ('jaxquant.calibration.ahead', 'compile_calibration_ahead'),\n"
    "               ('jaxquant.cli_ptq', 'load_model'), ('jaxquant.cli_ptq', 'check_params_finite'),\n"
    "               ('jaxquant.cli_ptq', 'eval_setup'), ('jaxquant.cli_ptq', '_export_preflight'),\n"
    "               ('jaxquant.recipe', 'apply_recipe'), ('jaxquant.data', 'build_calib_batches'),\n"
    "               ('jaxquant.calibration', 'quantize'), ('jaxquant.calibration.max', 'run_calibration'),\n"
    "               ('jaxquant.calibration.api', 'finalize'), ('jaxquant.export.early', 'plan_export'),\n"
    "               ('jaxquant.export.early', 'write_export'), ('jaxquant.cli_ptq', '_export'),\n"
    "               ('jaxquant.export.atomic', '_fsync_tree'), ('jaxquant.check', 'validate_checkpoint'),\n"
    "               ('jaxquant.export.hf', '_refuse_invalid')]:\n"
    "    _traced(_m, _n)\n"
    "import jaxquant.export.early as _early\n"
    "_fp = _early.EarlyExport._final_plan\n"
    "def _final_plan(self):  # called when the first pass has dispatched every tensor but the late ones\n"
    "    print(f'TRACE early first pass dispatched at {time.perf_counter() - T0:6.2f}', file=sys.stderr, flush=True)\n"
    "    return _fp(self)\n"
    "_early.EarlyExport._final_plan = _final_plan\n"
)

_JOB_PATCHES = {
    "job": "",
    # the HF export written after the calibration instead of from its start (export/early.py)
    "job-noearly": "import jaxquant.cli_ptq as c\nc.EARLY_EXPORT = False\n",
    # the loader leaves the interpreter's thread switch interval at Python's default (converters/hf.py)
    "job-switch5ms": "import jaxquant.converters.hf as h\nh.LOAD_SWITCH_INTERVAL = None\n",
    # the tokenizer loaded in the command's process instead of a child process (jaxquant/tokenizer.py)
    "job-tokthread": "import os\nos.environ['JAXQUANT_TOKENIZER_PROCESS'] = '0'\n",
    # the calibration is compiled after loading instead of on a thread while the weights load
    "job-noahead": (
        "import jaxquant.cli_overlap as o\n"
        "_spawn = o.spawn\n"
        "def spawn(name, fn, *a, **k):\n"
        "    if name == 'compile':\n"
        "        raise RuntimeError('probe: compile ahead off')\n"
        "    return _spawn(name, fn, *a, **k)\n"
        "o.spawn = spawn\n"
    ),
    # the weights read only once the compile thread has lowered the calibration (cli_overlap.LOAD_AFTER_LOWERING)
    "job-lowerfirst": "import jaxquant.cli_overlap as o\no.LOAD_AFTER_LOWERING = True\n",
    # XLA's GPU autotuner off (GEMM algorithms from heuristics): compile time against forward speed
    "job-autotune0": "",
    # XLA's Triton GEMM fusions off (plain cuBLAS GEMMs, fewer kernels to autotune)
    "job-notritongemm": "",
}

#: Extra environment of a job variant (``XLA_FLAGS`` entries; the command merges its own flags into them).
_JOB_ENV = {
    "job-autotune0": {"XLA_FLAGS": "--xla_gpu_autotune_level=0"},
    "job-notritongemm": {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"},
}


def job_variant(work: Path, variant: str, recipe: str):
    """Run the whole ``jaxquant ptq`` command in a fresh process with one patch; print its phase table."""
    argv = ["ptq", "--model", str(work / "src"), "--recipe", recipe, "--dataset", str(work / "calib.jsonl"),
            "--dataset-field", "text", "--calib-size", "512", "--calib-seq", "512", "--batch-size", "16",
            "--eval-windows", "0", "--export-path", str(work / f"probe_{variant}"), "--overwrite"]
    code = _JOB_TRACE + _JOB_PATCHES[variant] + (f"import sys\nsys.argv = ['jaxquant'] + {argv!r}\nfrom jaxquant.cli import console_main\ntry:\n"
                                                 "    console_main()\nfinally:\n"
                                                 "    print(f'TRACE console_main returned at {time.perf_counter() - T0:6.2f}', "
                                                 "file=sys.stderr, flush=True)\n")
    t0 = time.perf_counter()
    src = os.environ.get("PROBE_JAXQUANT_SRC", str(HERE.parent))  # a `git archive` with jaxquant_recipes, say
    env = os.environ | {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    for key, value in _JOB_ENV.get(variant, {}).items():
        env[key] = " ".join(filter(None, [env.get(key, ""), value]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    trace = "\n".join(ln for ln in r.stderr.splitlines() if ln.startswith("TRACE"))
    tail = (trace + "\n" + r.stdout[-1200:]) if r.returncode == 0 else (r.stdout[-1500:] + r.stderr[-2500:])
    print(f"job {variant}: rc {r.returncode}, process wall {dt:6.2f} s\n{tail}", flush=True)


def timed_compile(label, jitted, *args):
    """Print the trace / lower / XLA compile seconds of ``jitted`` on ``args``."""
    t0 = time.perf_counter()
    tr = jitted.trace(*args)
    t1 = time.perf_counter()
    lo = tr.lower()
    t2 = time.perf_counter()
    lo.compile()
    t3 = time.perf_counter()
    print(f"{label}: trace {t1 - t0:6.2f} s, lower {t2 - t1:6.2f} s, compile {t3 - t2:6.2f} s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--build", default=None)
    ap.add_argument("--recipe", default="general/ptq/fp8_qkvo-nvfp4_mlp")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: imports,load,compile,export")
    ap.add_argument("--load-variant", default=None)
    ap.add_argument("--jobs", default="", help="comma list of whole-command variants to run first: "
                    + ", ".join(_JOB_PATCHES))
    args = ap.parse_args()
    if args.load_variant:
        return load_variant(Path(args.work) / "src", args.load_variant)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work)
    if args.build:
        import bench_e2e_vs_modelopt as b

        ns = argparse.Namespace(shape=args.build, seed=0, dtype="bfloat16", calib_size=512, calib_seq=512)
        work.mkdir(parents=True, exist_ok=True)
        print("build", b.build_inputs(ns, work), flush=True)
    for variant in filter(None, args.jobs.split(",")):
        job_variant(work, variant, args.recipe)
    if "imports" not in skip:
        cold_imports()

    from jaxquant.numerics._exact import with_ieee_gpu_division

    os.environ["XLA_FLAGS"] = with_ieee_gpu_division(os.environ.get("XLA_FLAGS", ""))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    jax.devices()
    src = work / "src"
    if "load" not in skip:
        for variant in os.environ.get("PROBE_LOAD_VARIANTS", "serial-view,8-view,16-view,8-pread,16-pread,batched").split(","):
            subprocess.run([sys.executable, __file__, "--work", str(work), "--load-variant", variant], check=True)

    from jaxquant.converters.hf import load_hf
    from jaxquant.models.decoder import abstract_model

    t0 = time.perf_counter()
    loaded = load_hf(src, jnp.bfloat16)
    print(f"load_hf (current) {time.perf_counter() - t0:6.2f} s", flush=True)
    t0 = time.perf_counter()
    abstract_model(loaded.config, dtype=jnp.bfloat16)
    print(f"abstract_model {time.perf_counter() - t0:6.2f} s", flush=True)
    t0 = time.perf_counter()
    tok = loaded.tokenizer()
    print(f"tokenizer {time.perf_counter() - t0:6.2f} s", flush=True)
    model = loaded.model

    from jaxquant.calibration.max import calibrate_weights, make_step, set_calibration_modes
    from jaxquant.calibration.sites import quantizer_sites
    from jaxquant.quantizer.tensor_quantizer import QuantAmax
    from jaxquant.recipe import apply_recipe

    t0 = time.perf_counter()
    res = apply_recipe(model, args.recipe, warn=False)
    print(f"apply_recipe {time.perf_counter() - t0:6.2f} s", flush=True)
    t0 = time.perf_counter()
    sites = quantizer_sites(model)
    print(f"quantizer_sites {time.perf_counter() - t0:6.2f} s ({len(sites)} sites)", flush=True)
    t0 = time.perf_counter()
    calibrate_weights(sites, model)
    jax.block_until_ready(nnx.state(model, QuantAmax))
    print(f"calibrate_weights (jit, incl. compile) {time.perf_counter() - t0:6.2f} s", flush=True)
    set_calibration_modes(sites)

    if "compile" not in skip:
        graphdef, amax_state, rest = nnx.split(model, QuantAmax, ...)
        amax, amax_def = jax.tree_util.tree_flatten(amax_state)
        rest_l, rest_def = jax.tree_util.tree_flatten(rest)
        step = make_step(graphdef, amax_def, rest_def)
        ids = jax.ShapeDtypeStruct((16, 512), jnp.int32)
        timed_compile("calib step", step, amax, rest_l, ids, None)
        # one layer
        layer = model.model.layers[0]
        lg, lstate = nnx.split(layer)
        x = jax.ShapeDtypeStruct((16, 512, loaded.config.hidden_size), jnp.bfloat16)
        ropes = model.model.rope_tables(jnp.zeros((16, 512), jnp.int32), 512)
        masks = model.model.masks(None, 16, 512)

        def one(state, x, cos, sin, mask):
            m = nnx.merge(lg, state)
            y = m(x, cos=cos, sin=sin, mask=mask)
            return y, nnx.state(m, QuantAmax)

        cos, sin = ropes[layer.layer_type]
        timed_compile("one layer", jax.jit(one), lstate, x, cos, sin, masks[layer.layer_type])
        g0, g1 = nnx.graphdef(model.model.layers[0]), nnx.graphdef(model.model.layers[1])
        print("layer graphdefs equal:", g0 == g1, flush=True)

    if "export" not in skip:
        from jaxquant.calibration import quantize
        from jaxquant.data import build_calib_batches, config_token_ids

        sp = config_token_ids(loaded.hf_config)
        batches = build_calib_batches(str(work / "calib.jsonl"), tok, "512", 512, 16, pack=False, field="text",
                                      pad_id=sp["pad_id"], eos_id=sp["eos_id"], vocab_size=loaded.config.vocab_size)
        t0 = time.perf_counter()
        r = quantize(model, res, batches, progress=False)
        print(f"quantize {time.perf_counter() - t0:6.2f} s {r.timings}", flush=True)
        from jaxquant.export import export_hf

        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        export_hf(loaded, work / "probe_export", resolution=res, overwrite=True, progress=False)
        pr.disable()
        print(f"export_hf {time.perf_counter() - t0:6.2f} s", flush=True)
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40)
        print(s.getvalue()[:12000])
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue()[:8000])


if __name__ == "__main__":
    main()
