"""Helpers shared by the benchmarks: machine rates, FLOP counting, random-weight models, tables, JSON.

The benchmarks are not tests: they measure, print a short table last, and write
bench/results/<name>.json. The machine they run on is usually shared and noisy, so every
benchmark measures its reference (matmul rate, naive loop, raw read) in the same run, next to
the thing measured, and reports ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
_LOAD_AT_START = list(os.getloadavg())
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere, without installing
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# ------------------------------------------------------------------------------------- CLI, output


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--quick", action="store_true", help="small sizes (~30 s): a smoke test, not a measurement")
    p.add_argument("--tmp", default=None, help="folder for temporary data (default: the system temp dir)")
    p.add_argument("--out", default=None, help="JSON result path (default bench/results/<name>.json)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU run of extraction and training)")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads: a number, or auto = the faster of 1 and all cores on a short "
                        "probe (on a loaded machine OpenMP barriers make 2 threads several times slower than 1)")
    return p


def setup_threads(arg: str = "auto") -> dict:
    """Set torch's intra-op thread count; return what was chosen and why.

    On a shared machine whose cores are busy with other jobs, every OpenMP parallel region waits
    for its slowest thread to be scheduled: small ops (layer norms, GELUs, copies) then cost
    milliseconds each and a wav2vec2 forward runs several times slower with 2 threads than with 1.
    `auto` times a transformer-layer-sized probe at 1 thread and at all cores and keeps all cores
    only when they are clearly (1.3x) faster.
    """
    import torch

    cores = os.cpu_count() or 1
    if arg != "auto":
        _set_threads(int(arg))
        return {"threads": int(arg), "chosen_by": "--threads"}
    probe = {}
    for n in sorted({1, cores}):
        torch.set_num_threads(n)
        probe[n] = _thread_probe()
    # All cores only when clearly faster: when other jobs load the machine the probe's advantage
    # for 2 threads can flip to a several-fold loss within minutes, 1 thread degrades gracefully.
    best = cores if probe[cores] < probe[1] / 1.3 else 1
    _set_threads(best)
    return {"threads": best, "chosen_by": "auto probe (ms per transformer-layer-sized step)",
            "probe_ms": {str(k): round(v * 1e3, 2) for k, v in probe.items()}}


def _set_threads(n: int) -> None:
    """torch's intra-op pool and numpy/scipy's BLAS pools (scikit-learn fits suffer the same way)."""
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass


def _thread_probe(seconds: float = 0.6) -> float:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.randn(256, 768)
    w1, w2 = torch.randn(3072, 768) * 0.02, torch.randn(768, 3072) * 0.02
    times = []
    with torch.inference_mode():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            t = time.perf_counter()
            h = F.gelu(F.linear(F.layer_norm(x, (768,)), w1))
            y = x + F.linear(h, w2)
            times.append(time.perf_counter() - t)
    del y
    times.sort()
    return times[len(times) // 2]


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def machine() -> dict:
    import torch

    info = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": _LOAD_AT_START,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_result(name: str, data: dict, out: str | None = None) -> Path:
    """bench/results/<name>.json; a --quick run (a smoke test, not a measurement) writes to the temp
    dir instead, so that it never overwrites measured results."""
    if out:
        path = Path(out)
    elif data.get("quick"):
        path = Path(tempfile.gettempdir()) / "emofuse-bench-quick" / f"{name}.json"
    else:
        path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine(), **data}
    data["machine"]["loadavg_at_end"] = list(os.getloadavg())
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def table(rows: list[list], headers: list[str], title: str = "") -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        a = abs(x)
        if a >= 1000:
            return f"{x:,.0f}"
        if a >= 100:
            return f"{x:.0f}"
        if a >= 10:
            return f"{x:.1f}"
        if a >= 0.1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def _numeric(s: str) -> bool:
    return s.replace(",", "").replace(".", "").replace("-", "").replace("x", "").replace("%", "").strip().isdigit()


@contextlib.contextmanager
def temp_dir(base: str | None, prefix: str, keep: bool = False):
    path = Path(tempfile.mkdtemp(prefix=f"emofuse-bench-{prefix}-", dir=base))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# ------------------------------------------------------------------------------------- rates, FLOPs


def matmul_rate(dtype_name: str, device: str = "cpu", n: int | None = None, seconds: float = 2.0) -> dict:
    """FLOP/s of torch.matmul on large square matrices: the machine's practical peak for this dtype.

    Several sizes are tried and the best kept (the fastest size differs by dtype and load)."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    sizes = [n] if n else ([2048, 4096] if device == "cpu" else [8192])
    best = None
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        torch.matmul(a, b)  # warm-up
        _sync(device)
        k, start = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            k += 1
            _sync(device)
            el = time.perf_counter() - start
            if el >= seconds / len(sizes) and k >= 3:
                break
        rate = 2 * size**3 * k / el
        if best is None or rate > best["flops_per_s"]:
            best = {"dtype": dtype_name, "n": size, "flops_per_s": rate}
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def count_flops(fn) -> int:
    """FLOPs of one call of fn (matmuls, convolutions, attention), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_cpu_attention() -> None:
    """Give torch's flop counter formulas for the CPU attention kernel, once per process.

    torch counts its CUDA attention kernels but has no formula for the CPU one
    (`_scaled_dot_product_flash_attention_for_cpu`, which `F.scaled_dot_product_attention` runs on
    a CPU), so every FlopCounterMode on a CPU counted attention as free: 5.3% of wav2vec2-base's
    FLOPs on an 8 s clip, more on longer ones. The formulas are torch's own for the other kernels
    (two batched matmuls forward, four backward)."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    forward, backward = aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# ------------------------------------------------------------------------------------- models


def make_wav2vec2(folder: Path, **overrides) -> Path:
    """A random-weight wav2vec2 model (Wav2Vec2Config() defaults = wav2vec2-base size, group-norm
    feature encoder) saved as a transformers folder, for emofuse's `hf` backend. Same FLOPs as the
    real checkpoint: only the weights differ."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    quiet_transformers()
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(**overrides)
    model = Wav2Vec2Model(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    layer_norm = cfg.feat_extract_norm == "layer"
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=layer_norm).save_pretrained(folder)
    return folder


def make_roberta(folder: Path, **overrides) -> Path:
    """A random-weight RoBERTa model (RobertaConfig() defaults = roberta-base size)."""
    import torch
    from transformers import RobertaConfig, RobertaModel

    quiet_transformers()
    torch.manual_seed(0)
    cfg = RobertaConfig(**overrides)
    RobertaModel(cfg).eval().save_pretrained(folder)
    return folder


def write_clips(folder: Path, n: int, lo: float, hi: float, sr: int = 16000, seed: int = 0,
                durations: list[float] | None = None) -> list[tuple[Path, float]]:
    """n WAV files (16-bit PCM, mono) of uniformly drawn durations in [lo, hi] seconds (or of the
    given durations): a few harmonics with a wandering pitch plus noise, so that nothing is silent
    or constant."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        dur = float(rng.uniform(lo, hi)) if durations is None else durations[i]
        t = np.arange(int(dur * sr)) / sr
        f0 = 120 + 40 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t)
        phase = 2 * np.pi * np.cumsum(f0) / sr
        wav = sum(np.sin(k * phase) / k for k in (1, 2, 3)) * 0.2 + 0.02 * rng.standard_normal(len(t))
        path = folder / f"clip{i:04d}.wav"
        sf.write(path, wav.astype(np.float32), sr, subtype="PCM_16")
        out.append((path, len(t) / sr))
    return out


# ------------------------------------------------------------------------------------- memory


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def drop_file_cache(paths) -> str:
    """Evict files from the page cache: drop_caches when permitted (root on a real kernel), else
    posix_fadvise(DONTNEED) on each file. Returns which method was used."""
    paths = [Path(p) for p in paths]
    os.sync()  # dirty pages cannot be dropped
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED) on each shard (writing /proc/sys/vm/drop_caches is not permitted here)"


def cached_fraction(paths) -> float | None:
    """Fraction of the files' pages resident in the page cache (mmap + mincore), or None when it
    cannot be read. Checks that an eviction worked."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in bytes(vec))
                total += n
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else None
