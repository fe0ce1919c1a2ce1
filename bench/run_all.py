"""Run every benchmark in sequence (`make bench`); each is also runnable alone (python bench/<name>.py).

Each benchmark runs in its own process (so memory and threads of one never affect the next), prints
its table last, and writes bench/results/<name>.json. This script prints all tables again at the
end, with the time each took. Options are passed on to every benchmark (--quick, --threads, --tmp).
Sized to finish in under 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ORDER = ["extraction", "ablation", "cache_io", "training", "cached_vs_onthefly", "probe"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test, ~30 s each)")
    p.add_argument("--only", default=",".join(ORDER), help="comma-separated subset of: " + ", ".join(ORDER))
    p.add_argument("--threads", default="auto")
    p.add_argument("--tmp", default=None)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    extra = (["--quick"] if args.quick else []) + ["--threads", args.threads] + (["--tmp", args.tmp] if args.tmp else [])
    tables, failed = [], []
    start = time.perf_counter()
    for name in names:
        print(f"=== {name} ===", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *extra], stdout=subprocess.PIPE, text=True)
        took = time.perf_counter() - t0
        print(proc.stdout, end="", flush=True)
        if proc.returncode != 0:
            failed.append(name)
            tables.append(f"--- {name}: FAILED (exit {proc.returncode}) after {took:.0f} s")
        else:
            tables.append(f"--- {name} ({took:.0f} s)\n{proc.stdout.strip()}")
    total = time.perf_counter() - start
    print("\n=== summary ===")
    print("\n\n".join(tables))
    print(f"\nall benchmarks: {total / 60:.1f} min{'; FAILED: ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
