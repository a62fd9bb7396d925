"""Safetensors export writer: the streamed ``write_sharded`` against the previous one (a script, not a test).

Writes ``--total-gb`` of synthetic entries whose ``produce()`` runs a jitted JAX computation (on whatever
backend is present: CPU here, the GPU on an accelerator machine), laid out like a quantized decoder: per
"layer" a bf16 tensor, an FP8 tensor (scaled, clipped, cast) and a float32 scale. Each writer runs in its own
subprocess so that its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own:

* ``old``: the single-threaded writer before streaming (kept verbatim below: all of one shard produced and
  copied to host, then ``save_file``);
* ``new``: ``jaxquant.export.shards.write_sharded`` with its defaults (4 writer threads, 256 MB in flight);
* ``new-1GB`` / ``new-2GB``: the same with ``max_inflight_bytes`` 1 GB / 2 GB;
* ``new-8w``: the defaults with 8 writer threads.

Reported per writer: the median over ``--repeat`` writes of the seconds until ``write_sharded`` returns
(``write_s``, GB/s) and until the files are also fsynced (``fsync_s``, what an atomic export waits for),
the process's peak RSS, and the peak RSS above the RSS before the first write (``rss_added``: what the writer
itself holds). Prints a table and writes JSON (``--out``).

    python benchmarks/bench_export_writer.py                                 # 2 GB, ./benchmarks/results
    python benchmarks/bench_export_writer.py --total-gb 0.1 --repeat 1 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRITERS = {"old": {}, "new": {}, "new-1GB": {"max_inflight_bytes": 10**9}, "new-2GB": {"max_inflight_bytes": 2 * 10**9},
           "new-8w": {"workers": 8}}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _old_write_sharded(entries, directory, *, max_shard_size="10GB", total_parameters=None):
    """The single-threaded write_sharded before streaming (one shard in memory at a time, save_file per shard)."""
    import numpy as np

    from jaxquant.errors import ExportError
    from jaxquant.export import shards
    from jaxquant.io.safetensors import save_file

    d = Path(directory)
    plan = shards.plan_shards(entries, max_shard_size) or [[]]
    files = shards.shard_filenames(len(plan))
    weight_map = {}
    for fname, shard in zip(files, plan, strict=True):
        arrays = {}
        for e in shard:
            a = e.produce()
            if tuple(a.shape) != tuple(e.shape) or a.dtype != np.dtype(e.dtype):
                raise ExportError(f"tensor {e.name!r}: planned {e.shape} {e.dtype}, produced {a.shape} {a.dtype}")
            arrays[e.name] = a
            weight_map[e.name] = fname
        save_file(arrays, d / fname, metadata=shards.SAFETENSORS_METADATA)
        del arrays
    if len(files) > 1:
        meta = {"total_size": sum(e.nbytes for e in entries)}
        if total_parameters is not None:
            meta["total_parameters"] = int(total_parameters)
        (d / shards.INDEX_NAME).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2,
                                                      sort_keys=True) + "\n")
    return files


def _entries(total_bytes: int, rows: int, cols: int):
    """Synthetic quantized-decoder entries; produce() dispatches a jitted computation from a device-resident input."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    from jaxquant.export.shards import Entry

    x = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)

    @jax.jit
    def bf16_weight(x, i):
        return (x * (1.0 + i / 1000.0)).astype(jnp.bfloat16)

    @jax.jit
    def fp8_weight(x, i):
        amax = jnp.max(jnp.abs(x)) * (1.0 + i / 1000.0)
        scale = amax / 448.0
        return jnp.clip(x / scale, -448.0, 448.0).astype(jnp.float8_e4m3fn), scale.astype(jnp.float32)

    per_layer = rows * cols * 3  # bf16 + fp8
    n_layers = max(1, round(total_bytes / per_layer))
    ents = []
    for i in range(n_layers):
        cache = {}

        def fp8(key, i=i, cache=cache):
            if not cache:
                cache["weight"], cache["weight_scale"] = fp8_weight(x, i)
            return cache.pop(key)

        p = f"model.layers.{i}"
        ents.append(Entry(f"{p}.mlp.down_proj.weight", (rows, cols), np.dtype(ml_dtypes.bfloat16),
                          lambda i=i: bf16_weight(x, i)))
        ents.append(Entry(f"{p}.mlp.up_proj.weight", (rows, cols), np.dtype(ml_dtypes.float8_e4m3fn),
                          lambda fp8=fp8: fp8("weight")))
        ents.append(Entry(f"{p}.mlp.up_proj.weight_scale", (), np.dtype(np.float32),
                          lambda fp8=fp8: fp8("weight_scale")))
    jax.block_until_ready((bf16_weight(x, 0), fp8_weight(x, 0)))  # compile outside the timed region
    return ents


def _fsync_dir(d: Path) -> None:
    for p in d.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _child(args) -> dict:
    import jax

    from jaxquant.export.shards import write_sharded

    ents = _entries(int(args.total_gb * 1e9), args.rows, args.cols)
    total = sum(e.nbytes for e in ents)
    rss_before = _rss_now()
    write_s, fsync_s = [], []
    for r in range(args.repeat):
        d = Path(tempfile.mkdtemp(prefix="bench_export_writer_", dir=args.dir))
        try:
            t0 = time.perf_counter()
            if args.writer == "old":
                _old_write_sharded(ents, d, max_shard_size=args.max_shard_size)
            else:
                write_sharded(ents, d, max_shard_size=args.max_shard_size, **WRITERS[args.writer])
            t1 = time.perf_counter()
            _fsync_dir(d)
            t2 = time.perf_counter()
            write_s.append(t1 - t0)
            fsync_s.append(t2 - t0)
            if r == 0:
                digest = {p.name: p.stat().st_size for p in sorted(d.iterdir())}
        finally:
            shutil.rmtree(d, ignore_errors=True)
    write_s.sort(), fsync_s.sort()
    w, f = write_s[len(write_s) // 2], fsync_s[len(fsync_s) // 2]
    return {"writer": args.writer, "backend": jax.default_backend(), "bytes": total, "tensors": len(ents),
            "files": digest, "write_s": w, "fsync_s": f, "write_GBps": total / w / 1e9, "fsync_GBps": total / f / 1e9,
            "all_write_s": write_s, "rss_before": rss_before, "peak_rss": _peak_rss(),
            "rss_added": _peak_rss() - rss_before}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total-gb", type=float, default=2.0, help="bytes of tensors written (GB, 10**9)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096, help="each bf16 tensor is rows x cols (32 MB by default)")
    ap.add_argument("--max-shard-size", default="10GB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--writers", default=",".join(WRITERS), help=f"comma-separated, of {', '.join(WRITERS)}")
    ap.add_argument("--dir", default=None, help="where the files are written (default: the system temp dir)")
    ap.add_argument("--out", default=None, help="JSON report (default benchmarks/results/bench_export_writer_<backend>.json)")
    ap.add_argument("--writer", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.writer:
        print(json.dumps(_child(args)))
        return 0
    rows = []
    for w in args.writers.split(","):
        if w not in WRITERS:
            ap.error(f"unknown writer {w!r}")
        cmd = [sys.executable, __file__, "--writer", w, "--total-gb", str(args.total_gb), "--rows", str(args.rows),
               "--cols", str(args.cols), "--max-shard-size", args.max_shard_size, "--repeat", str(args.repeat)]
        if args.dir:
            cmd += ["--dir", args.dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    gb = 1e9
    print(f"{rows[0]['bytes'] / gb:.2f} GB in {rows[0]['tensors']} tensors, backend {rows[0]['backend']}, "
          f"max_shard_size {args.max_shard_size}, median of {args.repeat}")
    print("| writer | write s | GB/s | write+fsync s | GB/s | peak RSS GB | RSS added GB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['writer']} | {r['write_s']:.2f} | {r['write_GBps']:.2f} | {r['fsync_s']:.2f} | "
              f"{r['fsync_GBps']:.2f} | {r['peak_rss'] / gb:.2f} | {r['rss_added'] / gb:.2f} |")
    if len({json.dumps(r["files"]) for r in rows}) != 1:
        print("error: the writers wrote different files", file=sys.stderr)
        return 1
    out = args.out or str(Path(__file__).parent / "results" / f"bench_export_writer_{rows[0]['backend']}.json")
    report = {"argv": sys.argv[1:], "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "total_gb": args.total_gb, "max_shard_size": args.max_shard_size, "repeat": args.repeat, "results": rows}
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
