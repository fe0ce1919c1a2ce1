"""Fault injection on real extraction runs: disk full, a second writer, hostile inputs.
Run alone with `pytest -m faults`."""

import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from emofuse.cache.store import FeatureStore

pytestmark = pytest.mark.faults

def run_extract(tmp: Path, config: str, *extra, limit_bytes: int | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "emofuse.cli", "extract", config, *extra, "--quiet"]

    def limit():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def demo_corpus():
    from emofuse.corpora import demo

    demo.generate(DEMO_ROOT, size="small", seed=0, progress=False)  # once; later calls return at once


@pytest.fixture()
def text_config(tmp_path):
    """The small demo corpus, text only, small shards."""
    cfg = tmp_path / "text.yaml"
    cfg.write_text(
        "corpus: {name: demo, size: small, root: %s}\n"
        "extract: {cache: %s, encoders: {text: {backend: minilm}}, shard_mb: 0.03}\n"
        % (DEMO_ROOT, tmp_path / "cache"))
    return str(cfg)


DEMO_ROOT = Path(__file__).resolve().parent.parent / ".pytest_cache" / "demo-small"


def text_store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(next((tmp_path / "cache" / "demo").glob("text-*")))


def test_disk_full_stops_cleanly_and_resumes(tmp_path, text_config):
    first = run_extract(tmp_path, text_config)
    assert first.returncode == 0, first.stderr
    complete = text_store(tmp_path)
    expected = {u: complete.get(u) for u in complete.ids()}
    # The same run writes the same shards: pick a file-size limit that the first shard fits under
    # and a later, larger one does not.
    shards = sorted(complete.path.glob("shard-*.h5"))
    sizes = [p.stat().st_size for p in shards]
    j = next(k for k, size in enumerate(sizes) if size > sizes[0])
    limit = (sizes[0] + sizes[j]) // 2
    partial = sum(len(complete.shards[k]) for k in range(j))
    complete.close()

    cfg2_path = tmp_path / "limited.yaml"
    cfg2_path.write_text(Path(text_config).read_text().replace(str(tmp_path / "cache"), str(tmp_path / "cache2")))
    limited = run_extract(tmp_path, str(cfg2_path), limit_bytes=limit)
    assert limited.returncode == 2, limited.stdout + limited.stderr
    lines = [ln for ln in limited.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "could not write shard" in lines[-1], limited.stderr
    assert "Traceback" not in limited.stderr
    store_dir = next((tmp_path / "cache2" / "demo").glob("text-*"))
    assert FeatureStore.verify(store_dir) == []  # what was written stays valid, no .tmp left
    assert len(FeatureStore(store_dir)) == partial

    resumed = run_extract(tmp_path, str(cfg2_path))
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {partial}," in resumed.stdout
    store = FeatureStore(store_dir)
    assert sorted(store.ids()) == sorted(expected)
    for uid, x in expected.items():
        np.testing.assert_array_equal(store.get(uid), x)


def test_second_writer_is_refused_while_first_runs(tmp_path):
    cfg = tmp_path / "video.yaml"
    cfg.write_text(
        "corpus: {name: demo, size: small, root: %s}\n"
        "extract: {cache: %s, encoders: {video: {backend: dlib, fps: 3, upsample: 0, descriptor_every: 10}}}\n"
        % (DEMO_ROOT, tmp_path / "cache"))
    first = run_extract(tmp_path, str(cfg), wait=False)
    try:
        deadline = time.time() + 120
        lock = None
        while time.time() < deadline and first.poll() is None:
            locks = list((tmp_path / "cache" / "demo").glob("video-dlib-*/store.lock"))
            stores = [p.parent for p in locks if p.read_text().strip() == str(first.pid)]
            if stores:
                lock = stores[0]
                break
            time.sleep(0.05)
        assert lock is not None, "first extract never took the lock"
        second = run_extract(tmp_path, str(cfg))
        assert second.returncode == 2
        assert f"store is locked by PID {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
    # The killed writer's lock is stale: the next run takes it over and finishes.
    third = run_extract(tmp_path, str(cfg))
    assert third.returncode == 0, third.stderr
    assert FeatureStore.verify(lock) == []
