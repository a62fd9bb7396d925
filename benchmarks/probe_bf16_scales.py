"""Probe: which bf16 export's activation scales are closer to a float32 calibration of the same weights.

Given ModelOpt's and jaxquant's bf16 exports of one checkpoint (``bench_e2e_vs_modelopt.py --keep``) and a
jaxquant export of the same checkpoint calibrated in float32 (``jaxquant ptq --dtype float32``, same tokens), prints
per projection kind the worst and median relative difference of each bf16 ``input_scale`` / ``k_scale`` /
``v_scale`` from the float32 one, and how often jaxquant's is the closer. Writes JSON with ``--out``.

    python benchmarks/probe_bf16_scales.py --modelopt DIR --jaxquant DIR --fp32 DIR [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import numpy as np


def scales(d: Path) -> dict[str, float]:
    """Every scalar ``*input_scale`` / ``*k_scale`` / ``*v_scale`` of the safetensors files in ``d``."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "np") as fh:  # only the float32 scales are read (numpy has no bfloat16)
            for k in fh.keys():
                if k.endswith(("input_scale", "k_scale", "v_scale")):
                    out[k] = float(np.asarray(fh.get_tensor(k), np.float32).reshape(-1)[0])
    return out


def kind(name: str) -> str:
    return re.sub(r"^.*\.layers\.\d+\.", "", name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--modelopt", required=True)
    p.add_argument("--jaxquant", required=True)
    p.add_argument("--fp32", required=True, help="jaxquant export of the same checkpoint calibrated in float32")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    mo, jq, ref = scales(Path(a.modelopt)), scales(Path(a.jaxquant)), scales(Path(a.fp32))
    names = sorted(set(mo) & set(jq) & set(ref))
    rows: dict[str, dict] = {}
    for n in names:
        r = rows.setdefault(kind(n), {"mo": [], "jq": [], "jq_closer": 0, "n": 0})
        dm, dj = abs(mo[n] / ref[n] - 1), abs(jq[n] / ref[n] - 1)
        r["mo"].append(dm)
        r["jq"].append(dj)
        r["jq_closer"] += dj <= dm
        r["n"] += 1
    print(f"{'scale':<28} {'ModelOpt bf16 vs fp32 max / median':>36} {'jaxquant bf16 vs fp32 max / median':>36} "
          f"{'jaxquant closer':>16}")
    table = {}
    for k, r in sorted(rows.items()):
        t = {"modelopt_max": max(r["mo"]), "modelopt_median": statistics.median(r["mo"]),
             "jaxquant_max": max(r["jq"]), "jaxquant_median": statistics.median(r["jq"]),
             "jaxquant_closer": r["jq_closer"], "n": r["n"]}
        table[k] = t
        print(f"{k:<28} {100 * t['modelopt_max']:>16.2f}% / {100 * t['modelopt_median']:>6.2f}%       "
              f"{100 * t['jaxquant_max']:>16.2f}% / {100 * t['jaxquant_median']:>6.2f}%       "
              f"{t['jaxquant_closer']:>6}/{t['n']}")
    closer = sum(t["jaxquant_closer"] for t in table.values())
    print(f"jaxquant's bf16 scale is at least as close to float32 for {closer} of {len(names)} scales")
    if a.out:
        Path(a.out).write_text(json.dumps({"scales": len(names), "jaxquant_closer": closer, "by_kind": table},
                                          indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
