"""Do two checkouts give bit-identical results? (A refactoring must not change any.)

    python benchmarks/same_results.py OLD NEW --data-dir DATA [--runs NAME ...] [--jobs 2] [--out DIR]

OLD and NEW are checkout directories (e.g. a ``git worktree add --detach /tmp/old main``). Each
named run is made once per checkout with that checkout's ``src`` first on ``PYTHONPATH``, seed 0,
1 thread, on the CPU; then their ``result.json`` accuracy matrices (every setting), FLOP counts and
sample counts are compared exactly. Exit status 1 if any differ. The runs (``--runs`` picks some):
seq-mnist with the shipped presets of sgd, der++, sparcl-der++, rigl-der++, esacl-der++, packnet,
continual-dst and cl-lsg; digits with icarl, a-gem, ewc and lwf at their defaults; then SparCL and
EsaCL over their other parents and step branches (er, joint, sparcl-der++ with DDR, sparcl-er,
esacl-er, esacl, esacl-ewc, esacl-der++ without SAM and without SSE). ``--data-dir``
(or ``$SPARSECL_DATA``) holds MNIST; a slice of it makes a quick check.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RUNS: dict[str, list[str]] = {
    **{f"seq-mnist/{m}": ["--preset", f"seq-mnist-{p}"] for m, p in (
        ("sgd", "sgd"), ("der++", "der++-500"), ("sparcl-der++", "sparcl-der++-500-sp90"),
        ("rigl-der++", "rigl-der++-500-sp90"), ("esacl-der++", "esacl-der++-500-sp80"), ("packnet", "packnet"),
        ("continual-dst", "continual-dst"), ("cl-lsg", "cl-lsg"))},
    **{f"digits/{m}": ["--benchmark", "digits", "--method", m] for m in ("icarl", "a-gem", "ewc", "lwf")},
    # the mixins over each parent and each branch of their step (SparCL's DDR; EsaCL without SAM,
    # without SSE, on ER, on EWC, on fine-tuning)
    "seq-mnist/er": ["--preset", "seq-mnist-er-500"],
    "seq-mnist/joint": ["--preset", "seq-mnist-joint"],
    "seq-mnist/sparcl-der++-ddr": ["--preset", "seq-mnist-sparcl-der++-500-sp90", "-o", "ddr=true"],
    "seq-mnist/sparcl-er": ["--benchmark", "seq-mnist", "--method", "sparcl-er", "-o", "delta_k=0.1",
                            "-o", "importance_every=4"],
    "seq-mnist/esacl-er": ["--preset", "seq-mnist-esacl-er-500-sp80"],
    "seq-mnist/esacl": ["--preset", "seq-mnist-esacl-sp80"],
    "digits/esacl-ewc": ["--benchmark", "digits", "--method", "esacl-ewc"],
    "digits/esacl-der++-no-sam": ["--benchmark", "digits", "--method", "esacl-der++", "-o", "sam=false",
                                  "-o", "polytope=false"],
    "digits/esacl-der++-no-sse": ["--benchmark", "digits", "--method", "esacl-der++", "-o", "sse=false"],
}


def compared(result: dict) -> dict:
    """What must not change: accuracy matrices, FLOPs and sample counts."""
    return {"accuracy": {k: v["matrix"] for k, v in result["accuracy"].items()},
            "flops": result["flops"], "samples": result["samples"]}


def make(checkout: Path, name: str, data: str, out: Path) -> dict:
    run_dir = out / checkout.name / name.replace("/", "-")
    cmd = [sys.executable, "-m", "sparsecl", "run", *RUNS[name], "--data-dir", data, "--device", "cpu",
           "--threads", "1", "--seed", "0", "--out", str(run_dir), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return compared(json.loads((run_dir / "result.json").read_text()))


def first_difference(a: object, b: object, path: str = "") -> str | None:
    """Where two JSON values first differ (``None`` if they are equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}/{k} missing on one side"
            diff = first_difference(a[k], b[k], f"{path}/{k}")
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{path}[{i}]"))), None)
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--data-dir", default=os.environ.get("SPARSECL_DATA"))
    ap.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/same-results"))
    args = ap.parse_args(argv)
    if not args.data_dir:
        raise SystemExit("same_results.py: give --data-dir or set $SPARSECL_DATA")
    if args.old.resolve().name == args.new.resolve().name:
        raise SystemExit("same_results.py: the two checkouts need different directory names")
    jobs = [(c, n) for n in args.runs for c in (args.old.resolve(), args.new.resolve())]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: make(*job, args.data_dir, args.out), jobs))
    differ = 0
    for i, name in enumerate(args.runs):
        diff = first_difference(results[2 * i], results[2 * i + 1])
        differ += diff is not None
        print(f"{name}: {'identical' if diff is None else 'DIFFERS at ' + diff}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
