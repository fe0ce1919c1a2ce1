"""The batch stage over a dask.distributed cluster: the same work as pipeline.py, spread over workers.

    client                                          each worker (one dask thread)
    ------                                          -----------------------------
    ask a worker for the encoder's full spec  --->  build the encoder once, keep it for later tasks
    create / open the store, lock it for the
    whole run, list the ids already done
    cut ALL utterances into chunks of whole
    windows; one task per chunk not all done  --->  prepare + encode the chunk's windows (pipeline's
                                                    code), write the ids not done to
                                                    shard-w<k>-<seq>.h5 (no lock: the client holds it)
    append the failures each task returns     <---  encoded count + failures
    progress bar over completed tasks

Every worker must see the cache folder at the same path (one machine, or a shared filesystem).
Shard names never collide: chunk k writes only under the writer name `w<k>`, and a writer numbers its
shards after the ones already there. Failures are appended by the client alone, so failures.jsonl
has one writer, as in the local pipeline. Resume works the same: ids already in complete shards (or
in failures.jsonl) are not written again; a retried task (its worker died) also counts as done the
ids already in complete shards, such as those its earlier attempt wrote.

The batch plan is the local pipeline's (pipeline.window_plan, encode_windows): chunks are cut from
all utterances, whatever is already done, at multiples of the encoder's window_utterances, so the
windows inside a chunk, their length batches under the batch budget, and the numbers, are those of
a single-process run, uninterrupted or resumed (given the same torch thread count: with more threads
a matrix product may sum in another order). A chunk_size that is not a multiple of the window (only
for tests and small corpora) cuts windows short at the chunk ends: still the same batches on every
run with that chunk_size, but bit-identical to the single-process run only for encoders whose
features do not depend on their batch mates (such as openSMILE, which encodes each input alone).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

from tqdm import tqdm

from emofuse.cache.store import FeatureStore, ShardWriter
from emofuse.corpora.base import Corpus, Utterance
from emofuse.errors import UserError
from emofuse.extract.encoders.base import build_encoder, fingerprint
from emofuse.extract.pipeline import (ModalityResult, corpus_cache_dir, count_failure, encode_windows, store_path,
                                      window_plan, write_corpus_index)

CLIENT_WRITER = "client"  # the client's writer: holds the lock, appends failures, writes no shard


def extract_distributed(cfg, corpus: Corpus, client_or_address=None, n_workers: int = 2, chunk_size: int | None = None,
                        torch_threads: int | None = None, progress: bool = True, log=print) -> list[ModalityResult]:
    """Extract every modality of cfg.extract.encoders on a dask cluster.

    client_or_address: a dask.distributed Client, a scheduler address ("tcp://host:8786"), or None
    for a LocalCluster of `n_workers` processes with one thread each. chunk_size: utterances per
    task (default: a multiple of the encoder's window giving each worker about 4 tasks per modality;
    keep it a multiple of the window for single-process numbers, see the module doc). torch_threads:
    torch threads in each worker (dask's nanny sets OMP_NUM_THREADS=1; a LocalCluster defaults to its
    share of this machine's cores).
    """
    if not cfg.extract.encoders:
        raise UserError("the config names no encoders (extract.encoders: {text: {backend: minilm}, ...})")
    cache_dir = corpus_cache_dir(cfg.extract.cache, corpus.name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_corpus_index(corpus, cache_dir)
    if client_or_address is None and torch_threads is None:
        torch_threads = max(1, (os.cpu_count() or 1) // max(1, n_workers))
    results = []
    with connect(client_or_address, n_workers) as client:
        for modality, spec in cfg.extract.encoders.items():
            results.append(extract_modality_distributed(
                client, corpus.utterances, modality, dict(spec), cache_dir,
                budget=cfg.extract.batch_budget.get(modality, 1 << 30), workers=cfg.extract.workers,
                shard_bytes=int(cfg.extract.shard_mb * (1 << 20)), retry_failures=cfg.extract.retry_failures,
                chunk_size=chunk_size, torch_threads=torch_threads, progress=progress, log=log))
    return results


@contextlib.contextmanager
def connect(client_or_address, n_workers: int):
    """A Client: the one given, one connected to a scheduler address, or a new LocalCluster's."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as e:
        raise UserError(f"distributed extraction needs dask[distributed] ({e})") from None
    if isinstance(client_or_address, Client):
        yield client_or_address
        return
    if client_or_address is not None:
        try:
            client = Client(client_or_address, timeout="30s")
        except (OSError, TimeoutError) as e:
            raise UserError(f"cannot reach the dask scheduler at {client_or_address}: {e}") from None
        with client:
            yield client
        return
    if n_workers < 1:
        raise UserError(f"need at least one dask worker, got n_workers={n_workers}")
    # processes: each worker holds its own model and GIL; one thread each: one encoder forward at a
    # time per worker (the prepare threads inside a task do the CPU decoding).
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def extract_modality_distributed(client, utterances: list[Utterance], modality: str, spec: dict, cache_dir: Path,
                                 budget: int, workers: int = 2, shard_bytes: int = 64 << 20,
                                 retry_failures: bool = False, chunk_size: int | None = None,
                                 torch_threads: int | None = None, progress: bool = True, log=print) -> ModalityResult:
    from dask.distributed import as_completed

    # The model is loaded on a worker, never on the client: the client only needs its description.
    described = client.submit(describe_encoder, modality, spec, torch_threads, pure=False).result()
    full_spec = described["spec"]
    store = FeatureStore.create(store_path(cache_dir, modality, full_spec), modality, full_spec, fingerprint(full_spec),
                                dim=described["dim"], layers=described["layers"], fps=described["fps"])
    store.close()
    result = ModalityResult(modality, str(store.path))

    with store.writer(CLIENT_WRITER) as lock_holder:  # the store's lock, for the whole run
        for tmp in store.path.glob("shard-*.h5.tmp"):
            tmp.unlink()  # left by a killed worker; nobody else can be writing while we hold the lock
        store = FeatureStore(store.path)  # the index as it is now that we hold the lock
        done = set(store.ids())
        if not retry_failures:
            earlier = set(store.failures()) - done
            result.failed_before = sum(1 for u in utterances if u.id in earlier)
            done |= earlier
        store.close()
        todo = [u for u in utterances if u.id not in done]
        by_id = {u.id: u for u in utterances}
        result.skipped = len(utterances) - len(todo)
        if not todo:
            log(f"{modality}: all {len(utterances)} utterances already in {store.path} (skipped, no encoder work)")
            return result
        if result.skipped:
            log(f"{modality}: skipping {result.skipped} utterances already done, encoding {len(todo)}")

        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        window = described["window"]
        size = chunk_size or window * max(1, math.ceil(len(utterances) / (window * 4 * n_workers)))
        # Cut from ALL utterances (window_plan), never from `todo`: a chunk then holds the windows of a
        # single-process run, whatever an earlier run stored. A chunk with nothing left is not sent.
        chunks = [(k, chunk) for k, chunk in enumerate(window_plan(utterances, size))
                  if any(u.id not in done for u in chunk)]
        start = time.perf_counter()
        futures = [client.submit(encode_chunk, modality, spec, str(store.path), f"w{k}", chunk,
                                 {u.id for u in chunk if u.id in done}, budget, workers, shard_bytes, torch_threads,
                                 pure=False)
                   for k, chunk in chunks]
        sizes = {f.key: sum(1 for u in c if u.id not in done) for f, (_, c) in zip(futures, chunks)}
        try:
            with tqdm(total=len(todo), desc=f"extract {modality}", unit="utt", disable=not progress) as bar:
                for future in as_completed(futures):
                    encoded, failures = future.result()
                    result.encoded += encoded
                    for rec in failures:
                        lock_holder.add_failure(rec["id"], rec["stage"], rec["reason"])
                        count_failure(result, by_id[rec["id"]], rec["stage"], rec["reason"])
                    bar.update(sizes[future.key])
        except BaseException:
            client.cancel(futures)  # e.g. a config error in the encoder: stop the other chunks too
            raise
        result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------
# on the workers


_ENCODERS: dict = {}  # (modality, spec) -> Encoder, per worker process: built once, used by every task


def worker_encoder(modality: str, spec: dict, torch_threads: int | None):
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    key = (modality, json.dumps(spec, sort_keys=True))
    if key not in _ENCODERS:
        _ENCODERS[key] = build_encoder(modality, spec)
    return _ENCODERS[key]


def describe_encoder(modality: str, spec: dict, torch_threads: int | None = None) -> dict:
    encoder = worker_encoder(modality, spec, torch_threads)
    return {"spec": encoder.full_spec(), "dim": encoder.dim, "fps": encoder.fps,
            "layers": getattr(encoder, "layers_out", 1), "window": encoder.window_utterances}


class WorkerWriter(ShardWriter):
    """A worker's shard writer: takes no lock (the client holds the store's lock for the whole run)
    and hands failures back to the client instead of appending to failures.jsonl itself."""

    def __init__(self, store: FeatureStore, writer_name: str, max_shard_bytes: int):
        super().__init__(store, writer_name, max_shard_bytes)
        self.failures: list[dict] = []

    def _lock(self) -> None:
        pass

    def _unlock(self) -> None:
        pass

    def add_failure(self, uid: str, stage: str, reason: str) -> None:
        self.failures.append({"id": uid, "stage": stage, "reason": reason})


def encode_chunk(modality: str, spec: dict, path: str, writer_name: str, chunk: list[Utterance], done: set[str],
                 budget: int, workers: int, shard_bytes: int, torch_threads: int | None) -> tuple[int, list[dict]]:
    """Prepare, encode and write one chunk, as pipeline.extract_modality does: its windows whole,
    writing only the ids not in `done` (the client's view: stored or failed before). (encoded, failures)."""
    encoder = worker_encoder(modality, spec, torch_threads)
    store = FeatureStore(Path(path))
    # A retry of this task (its worker died) must not write again what the first attempt wrote.
    done = set(done) | {u.id for u in chunk if u.id in store}
    store.close()

    result = ModalityResult(modality, path)
    with WorkerWriter(store, writer_name, shard_bytes) as writer:
        encode_windows(encoder, window_plan(chunk, encoder.window_utterances), done, budget, writer, result, workers)
    return result.encoded, writer.failures
