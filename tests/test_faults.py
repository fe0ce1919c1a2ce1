"""Fault injection on real extraction runs: disk full, a second writer, hostile inputs.
Run alone with `pytest -m faults`."""

import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from csv import DictReader
from pathlib import Path

import h5py
import numpy as np
import pytest

from emofuse.cache.shard import Shard
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


# --- item 1: kill anywhere, resume exactly --------------------------------------------------------

# Children get one BLAS/torch thread (a shared 2-core machine) and unbuffered output (a SIGKILLed
# child would otherwise lose the lines it printed).
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
KILL_SHARD_MB = 0.01  # ~1-2 demo utterances of minilm states per shard: ~30 shards, many kill points


def shard_ids(paths) -> dict[str, list[str]]:
    """ids of each complete shard file (published shards never change, so reading them later is exact)."""
    out = {}
    for p in paths:
        shard = Shard(p)
        out[p.name] = list(shard.ids)
        shard.close()
    return out


def published(store_dir: Path | None) -> list[Path]:
    return sorted(store_dir.glob("shard-*.h5")) if store_dir is not None else []


@pytest.mark.slow  # ~1 min: 11 extraction start-ups
def test_kill_loop_resumes_exactly(tmp_path, text_config):
    """SIGKILL `emofuse extract` again and again (during start-up, right after a shard is published,
    and while a shard is being written), restart it each time, and end with the store an
    uninterrupted run writes, bit for bit. Text is not padded, so this holds only because every
    restart meets the same batches (pipeline.window_plan); windows cut from the utterances left to
    do gave 41 of 4,608 values 1 ulp off here."""
    # Small encoder batches: encoding and shard writes interleave over the run instead of one burst.
    base = ["extract", text_config, f"extract.shard_mb={KILL_SHARD_MB}", "extract.batch_budget.text=64", "--quiet"]
    ref = subprocess.run([sys.executable, "-m", "emofuse.cli", *base], capture_output=True, text=True,
                         env=CHILD_ENV, timeout=300)
    assert ref.returncode == 0, ref.stderr
    reference = FeatureStore(next((tmp_path / "cache" / "demo").glob("text-*")))
    expected = reference.load_all()
    shard_bytes = int(KILL_SHARD_MB * (1 << 20))
    biggest = max(x.nbytes for x in expected.values())
    assert len(reference.shards) >= 20, "too few shards for varied kill points"
    reference.close()

    cache = tmp_path / "killed"
    cmd = [sys.executable, "-m", "emofuse.cli", *base, f"extract.cache={cache}"]
    rng = random.Random(7)  # varied but reproducible kill points
    plan = ([("startup", round(rng.uniform(0.3, 1.5), 2)) for _ in range(2)]
            + [("published", rng.randint(1, 3)) for _ in range(4)]
            + [("writing", rng.randint(1, 3)) for _ in range(4)])
    rng.shuffle(plan)

    store_dir, kills, logs, stale_tmps = None, [], [], {}
    for kind, arg in plan:
        out_path = tmp_path / f"run-{len(kills)}.log"
        with open(out_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV)
        try:
            at_start = len(published(store_dir))
            if kind == "startup":
                time.sleep(arg)  # importing torch, loading the model, opening the store
            else:
                # Sleep-poll until this process holds the store's lock (encoding is about to start),
                # then poll without sleeping: a shard write lasts a few milliseconds.
                while proc.poll() is None:
                    found = list((cache / "demo").glob("text-*/store.lock"))
                    if found and found[0].read_text().strip() == str(proc.pid):
                        store_dir = found[0].parent
                        break
                    time.sleep(0.005)
                while proc.poll() is None:
                    names = os.listdir(store_dir)
                    n = sum(1 for f in names if f.endswith(".h5"))
                    writing = any(f.endswith(".h5.tmp") for f in names)
                    if kind == "published" and n - at_start >= arg:
                        break
                    if kind == "writing" and writing and n - at_start >= arg - 1:
                        break
                    if kind == "writing" and n - at_start > arg + 1:
                        break  # its writes slipped between two polls (a busy machine): kill now instead
            before = published(store_dir)
            assert proc.poll() is None, f"extract finished before kill point {kind} {arg}: {out_path.read_text()}"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        if store_dir is None:
            store_dir = next(iter((cache / "demo").glob("text-*")), None)
        after = published(store_dir)
        # A .tmp that this run wrote (a stale one from the previous kill has the same name and mtime
        # until the next writer removes it).
        tmps = {p.name: p.stat().st_mtime_ns for p in store_dir.glob("*.tmp")} if store_dir is not None else {}
        leftover = [store_dir / name for name, t in tmps.items() if stale_tmps.get(name) != t]
        stale_tmps = tmps
        before_ids, after_ids = shard_ids(before), shard_ids(after)
        # A kill never loses or damages a published shard: every one still opens, with the same ids.
        assert all(after_ids.get(name) == ids for name, ids in before_ids.items())
        if store_dir is not None and (store_dir / "store.json").exists():
            FeatureStore(store_dir).close()  # opens: no truncated shard, no id twice
        lost = 0
        for tmp in leftover:  # killed during a shard write: that one shard is what is lost
            if tmp.name.endswith(".h5.tmp"):
                try:
                    with h5py.File(tmp, "r") as f:  # readable when the kill came after write(), before rename
                        lost = len(f["ids"])
                        assert f["features"].size * 2 <= shard_bytes + biggest  # one shard, no more
                        assert not set(s.decode() for s in f["ids"][:]) & {i for ids in after_ids.values() for i in ids}
                except OSError:
                    lost = -1  # cut inside write(): not readable, ignored and removed by the next run
        kills.append({"kind": kind, "arg": arg, "stored_before": sum(map(len, before_ids.values())),
                      "stored_after": sum(map(len, after_ids.values())), "mid_write": bool(leftover),
                      "tmp_ids": lost})
        logs.append(out_path.read_text())

    final = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    logs.append(final.stdout)

    # Each restart skipped exactly the utterances in published shards and redid the rest: the work
    # redone after a kill is what the killed run held unpublished, i.e. the writer's buffer (less than
    # shard_mb by the flush rule) or the one shard being written, plus the batch being encoded (and
    # the whole of a batch that was partly published, whose forwards must be the same to give the
    # same bits; its window is tokenized again).
    for k, kill in enumerate(kills):
        m = re.search(r"text: skipping (\d+) utterances", logs[k + 1])
        if m:  # absent when that run was itself killed before reaching the line, or nothing was stored
            assert int(m.group(1)) == kill["stored_after"], (k, kill, logs[k + 1])
    assert f"skipped {kills[-1]['stored_after']}," in final.stdout
    print("\nkills:", *kills, sep="\n  ")

    assert len(kills) >= 10
    assert sum(k["mid_write"] for k in kills) >= 1, kills  # at least one kill landed inside a shard write
    store = FeatureStore(store_dir)
    ids = [uid for shard in store.shards for uid in shard.ids]
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == set(expected)  # each exactly once
    for uid, x in expected.items():
        np.testing.assert_array_equal(store.get(uid), x)  # bit-identical to the uninterrupted run
    store.close()
    assert not list(cache.glob("**/*.tmp"))
    verify = subprocess.run([sys.executable, "-m", "emofuse.cli", "cache", "verify", str(cache)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


# --- item 3: hostile media and text -----------------------------------------------------------------

MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[2:]); "
           "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
           "sys.exit(r.returncode)")


def run_measured(cmd: list[str], rss_file: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` under a small wrapper whose only child it is: the wrapper's RUSAGE_CHILDREN peak is the
    command's own peak RSS (ours would include every child this pytest process ever had). In MB."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(rss_file), *cmd], capture_output=True, text=True,
                         env=CHILD_ENV, timeout=900)
    return out, int(rss_file.read_text()) / 1024


def hostile_corpus(root: Path) -> tuple[Path, dict, str]:
    """A manifest of broken, empty, huge and odd inputs plus one ordinary utterance. Returns the CSV,
    {(modality, id): the start of the expected failure, or None for features}, and the long transcript."""
    import av
    import soundfile as sf

    from tests.test_media import write_mp4

    sr, rng = 16000, np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    speech = (0.1 * rng.standard_normal(2 * sr)).astype(np.float32)
    sf.write(root / "full.wav", speech, sr, subtype="PCM_16")
    data = (root / "full.wav").read_bytes()
    (root / "truncated.wav").write_bytes(data[: len(data) // 2])  # a download cut in half
    (root / "zero.wav").write_bytes(b"")
    sf.write(root / "header_only.wav", np.zeros(0, np.float32), sr, subtype="PCM_16")
    nan = speech.copy()
    nan[1000:1100] = np.nan
    sf.write(root / "nan.wav", nan, sr, subtype="FLOAT")
    sf.write(root / "silence.wav", np.zeros(2 * sr, np.float32), sr, subtype="PCM_16")
    with sf.SoundFile(root / "hour.wav", "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for _ in range(60):  # an hour of low noise, a minute at a time (115 MB)
            f.write((0.01 * rng.standard_normal(60 * sr)).astype(np.float32))

    clip = sorted((DEMO_ROOT / "video").glob("*.mp4"))[0]
    (root / "random.mp4").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "cut.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with av.open(str(clip)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    noise = np.clip(128 + rng.normal(0, 10, (10, *frames.shape[1:])), 0, 255).astype(np.uint8)
    write_mp4(root / "no_face.mp4", noise)  # grey noise: no face in any frame
    write_mp4(root / "one_frame.mp4", frames[len(frames) // 2 : len(frames) // 2 + 1])

    demo_row = next(r for r in DictReader(open(DEMO_ROOT / "metadata.csv")))
    words = "the a happy sad angry office weekend neighbour believe tuesday friend dare this me about".split()
    long_text = " ".join(rng.choice(words, 100_000))
    rows = [  # id, audio, video, text (bytes: one cell is not UTF-8)
        ("ok", str(DEMO_ROOT / demo_row["audio"]), str(DEMO_ROOT / demo_row["video"]), demo_row["text"].encode()),
        ("truncated_wav", "truncated.wav", "", b""),
        ("zero_wav", "zero.wav", "", b""),
        ("header_only_wav", "header_only.wav", "", b""),
        ("nan_wav", "nan.wav", "", b""),
        ("silent_wav", "silence.wav", "", b""),
        ("hour_wav", "hour.wav", "", b""),
        ("random_mp4", "", "random.mp4", b""),
        ("cut_mp4", "", "cut.mp4", b""),
        ("no_face", "", "no_face.mp4", b""),
        ("one_frame", "", "one_frame.mp4", b""),
        ("whitespace_text", "", "", b"   "),
        ("latin1_text", "", "", "caf\u00e9 au lait".encode("latin-1")),
        ("long_text", "", "", long_text.encode()),
    ]
    lines = [b"id,audio,video,text,label,split"]
    for uid, audio, video, text in rows:
        lines.append(b",".join([uid.encode(), audio.encode(), video.encode(), b'"' + text + b'"', b"neutral", b"train"]))
    csv = root / "manifest.csv"
    csv.write_bytes(b"\n".join(lines) + b"\n")

    expect = {}
    for uid, audio, video, text in rows:
        expect["audio", uid] = None if audio or video else "decode: utterance has no audio or video file"
        expect["text", uid] = None if text.strip() else "text: empty transcript"
        expect["video", uid] = None if video else "decode: utterance has no video file"
    expect.update({
        ("audio", "truncated_wav"): "decode: truncated file: ",
        ("audio", "zero_wav"): "decode: cannot decode audio of ",
        ("audio", "header_only_wav"): "decode: no audio samples in ",
        ("audio", "nan_wav"): "decode: audio contains NaN or Inf values",
        ("audio", "random_mp4"): "decode: cannot decode audio of ",
        ("audio", "cut_mp4"): "decode: cannot decode audio of ",
        ("audio", "no_face"): "decode: no audio stream in ",
        ("audio", "one_frame"): "decode: no audio stream in ",
        ("video", "random_mp4"): "decode: cannot decode video of ",
        ("video", "cut_mp4"): "decode: cannot decode video of ",
        ("video", "no_face"): "face: no face found in ",
        ("text", "latin1_text"): "decode: transcript is not valid UTF-8 (byte 0xe9 at character 4; manifest.csv line 14)",
    })
    return csv, expect, long_text


@pytest.mark.slow  # ~2 min: an hour of audio and 100,000 words
def test_hostile_inputs_fail_precisely_and_the_run_goes_on(tmp_path):
    csv, expect, long_text = hostile_corpus(tmp_path / "corpus")
    cfg = tmp_path / "hostile.yaml"
    cfg.write_text(
        f"corpus: {{name: manifest, root: {csv}}}\n"
        f"extract: {{cache: {tmp_path / 'cache'}, encoders: {{audio: {{backend: opensmile}}, text: {{backend: minilm}}, "
        f"video: {{backend: dlib, fps: 3, upsample: 0, descriptor_every: 10}}}}}}\n")
    start = time.perf_counter()
    out, peak_mb = run_measured([sys.executable, "-m", "emofuse.cli", "extract", str(cfg), "--quiet"],
                                tmp_path / "rss")
    seconds = time.perf_counter() - start
    print(f"\nhostile extraction: {seconds:.0f} s, peak RSS {peak_mb:.0f} MB\n{out.stdout}")
    assert out.returncode == 0, out.stdout + out.stderr  # the run went on to the end
    assert "Traceback" not in out.stderr

    stores = {p.parent.name.split("-")[0]: p.parent for p in (tmp_path / "cache" / "manifest").glob("*/store.json")}
    for modality, store_dir in stores.items():
        store = FeatureStore(store_dir)
        failures = store.failures()
        for (m, uid), reason in expect.items():
            if m != modality:
                continue
            if reason is None:
                assert uid in store and uid not in failures, (m, uid, failures.get(uid))
                assert np.isfinite(store.get(uid).astype(np.float32)).all()
            else:
                assert uid not in store and uid in failures, (m, uid)
                got = f"{failures[uid]['stage']}: {failures[uid]['reason']}"
                assert got.startswith(reason), (m, uid, got)
                assert "\n" not in got and len(got) < 300, got  # one precise line
        # The summary counts this run's failures by reason, as failures.jsonl records them.
        m = re.search(rf"^{modality}: encoded (\d+), skipped 0, failed (\d+) .*\n  failures: (\d+) \((.*)\)$",
                      out.stdout, re.M)
        assert m, out.stdout
        assert int(m.group(1)) == len(store) and int(m.group(2)) == int(m.group(3)) == len(failures)
        assert sum(int(n) for n in re.findall(r": (\d+)(?:, |$)", m.group(4))) == len(failures)
        store.close()

    audio, text, video = (FeatureStore(stores[m]) for m in ("audio", "text", "video"))
    # Silence is a signal like any other; the hour is processed in windows and still gives 100 frames/s,
    # its first window exactly what one openSMILE pass over that minute gives.
    assert audio.get("silent_wav").shape[1] == 25
    hour = audio.get("hour_wav")
    assert abs(len(hour) - 3600 * 100) <= 10
    from emofuse.extract.encoders.base import build_encoder
    from emofuse.corpora.base import Utterance

    enc = build_encoder("audio", {"backend": "opensmile"})
    first = enc.prepare(Utterance(id="m", audio=str(tmp_path / "corpus" / "hour.wav"), start=0.0, end=60.0))
    np.testing.assert_array_equal(hour[:5000], first[:5000].astype(np.float16))
    # The 1-frame video gives one row; the 100,000-word transcript all its tokens (chunked, not cut).
    assert video.get("one_frame").shape == (1, 264)
    text_enc = build_encoder("text", {"backend": "minilm"})
    tokens = text_enc.prepare(Utterance(id="t", text=long_text))
    assert text.get("long_text").shape == (len(tokens) + 2, 384) and len(tokens) >= 100_000
    head = text_enc.encode([tokens[: text_enc.max_tokens - 2]])[0]  # the first window on its own
    np.testing.assert_allclose(text.get("long_text")[:100].astype(np.float32), head[:100], atol=1e-2)
    for s in (audio, text, video):
        s.close()
    # Memory stays bounded: measured ~1.5 GB here (model + one hour of audio held once + the long
    # transcript's output); one-pass openSMILE alone took 2.7 GB for the hour, one-forward text 3.5 GB.
    assert peak_mb < 2500, peak_mb


# --- item 5: stale or foreign caches ---------------------------------------------------------------

def test_train_refuses_a_store_of_other_encoder_settings(tmp_path, text_config):
    first = run_extract(tmp_path, text_config)
    assert first.returncode == 0, first.stderr
    made = text_store(tmp_path)
    made.close()
    cmd = [sys.executable, "-m", "emofuse.cli", "train", text_config, "model.modalities=[text]",
           f"train.runs={tmp_path / 'runs'}", "train.epochs=1", "train.num_threads=1", "--quiet"]
    refused = subprocess.run([*cmd, "extract.encoders.text.layer=3"], capture_output=True, text=True,
                             env=CHILD_ENV, timeout=300)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    line = refused.stderr.strip()
    assert line.startswith("error: no text feature store") and "\n" not in line and "Traceback" not in line
    assert f"(fingerprint {made.fingerprint[:12]}), differs in layer: config 3, store -1;" in line
    assert "the config's settings give fingerprint " in line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/seed-*/model.json"))
    # The settings it was made with are accepted, and nothing was mixed in.
    ok = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
