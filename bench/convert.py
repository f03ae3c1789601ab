"""Conversion throughput and peak host memory, both directions, next to a plain copy of the bytes.

Uses the synthetic checkpoint that bench/load_memory.py writes (internlm2-1_8b shapes, bf16, 3.78 GB):

    python bench/load_memory.py            # once, to create /tmp/internlm-jax-bench/ckpt
    python bench/convert.py --src /tmp/internlm-jax-bench/ckpt

Each step runs in a fresh process that reports its own peak RSS (ru_maxrss).
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEP = """
import json, resource, sys, time
from conversion.convert import hf_to_orbax, orbax_to_hf
t = time.perf_counter()
{call}
print(json.dumps(dict(seconds=time.perf_counter() - t, \
peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_step(call: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP.format(call=call)], capture_output=True, text=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--src", default="/tmp/internlm-jax-bench/ckpt")
    p.add_argument("--work", default="/tmp/internlm-jax-bench/convert")
    args = p.parse_args()
    src, work = Path(args.src), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    nbytes = size_of(src)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(work / "copy")], check=True)
    copy_s = time.perf_counter() - t
    print(f"plain copy (cp -r): {nbytes / 1e9:.2f} GB in {copy_s:.1f}s = {nbytes / copy_s / 1e9:.2f} GB/s; "
          f"peak RSS of cp {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
    shutil.rmtree(work / "copy")
    steps = [("hf-to-orbax", f"hf_to_orbax({str(src)!r}, {str(work / 'ox')!r}, progress=False)", work / "ox"),
             ("orbax-to-hf", f"orbax_to_hf({str(work / 'ox')!r}, {str(work / 'hf')!r}, progress=False)", work / "hf")]
    for name, call, out in steps:
        r = run_step(call)
        print(f"{name}: {nbytes / 1e9:.2f} GB in {r['seconds']:.1f}s = {nbytes / r['seconds'] / 1e9:.2f} GB/s; "
              f"peak RSS {r['peak_rss_mb']:.0f} MiB; output {size_of(out) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
