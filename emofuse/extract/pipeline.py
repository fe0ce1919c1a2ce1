"""The batch stage: run each frozen encoder over a corpus once and write its features to a store.

For each modality:  windows -> prepare (threads) -> length buckets -> encode -> shard writer.
Ids already in the store (or already recorded as failures) are not written again, so a second run
does no encoder work and a killed run resumes, redoing at most one unwritten shard (plus the batches
of the one window it was in, see window_plan).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from emofuse.cache.store import FeatureStore
from emofuse.corpora.base import Corpus, Utterance, write_utterances
from emofuse.errors import PrepareError, UserError
from emofuse.extract.batching import length_batches
from emofuse.extract.encoders.base import Encoder, build_encoder, fingerprint, tag

# Utterances are prepared a window at a time (encoder.window_utterances; sorted by length into
# batches); the next window is prepared while this one encodes.
#
# The batch plan (windows, then length batches inside each window) depends on the corpus, the
# encoder's window and the batch budget only, never on what an earlier run already stored: windows
# are cut from ALL utterances in their given order, and an utterance already done stays in its
# window (it is prepared, and encoded when a batch mate is not done, but not written again). An
# utterance's features may depend on its batch mates in the last bits (exact-length text forwards,
# audio convolutions), so this is what makes a resumed or distributed run bit-identical to an
# uninterrupted single-process one with the same config. The cost: a resume re-prepares the one
# window that was in progress at the kill and re-encodes its batches that hold an unwritten
# utterance; windows with nothing left to do are skipped without any work.


@dataclass
class ModalityResult:
    modality: str
    store: str
    encoded: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    failure_reasons: dict[str, int] = field(default_factory=dict)  # "stage: reason" -> count, this run
    failed_before: int = 0  # utterances skipped because an earlier run recorded them as failures


def summary_lines(results: list[ModalityResult]) -> list[str]:
    """What `emofuse extract` prints at the end: per modality what was done, then this run's
    failures counted by reason, most frequent first."""
    lines = []
    for r in results:
        lines.append(f"{r.modality}: encoded {r.encoded}, skipped {r.skipped}, failed {r.failed} "
                     f"in {r.seconds:.1f}s -> {r.store}")
        if r.failed:
            counts = sorted(r.failure_reasons.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append(f"  failures: {r.failed} (" + ", ".join(f"{reason}: {n}" for reason, n in counts) + ")")
        if r.failed_before:
            lines.append(f"  {r.failed_before} utterance(s) that failed in an earlier run were skipped "
                         f"(`emofuse cache info {r.store}` lists them; extract.retry_failures=true retries them)")
    return lines


def count_failure(result: ModalityResult, utt: Utterance, stage: str, reason: str) -> None:
    """Count one failure under its reason. The utterance's own file names are taken out of the key,
    so that one problem met in many files counts as one reason (failures.jsonl keeps them)."""
    for path in {utt.audio, utt.video} - {None}:
        reason = reason.replace(path, "<file>")
    key = f"{stage}: {reason}"
    result.failed += 1
    result.failure_reasons[key] = result.failure_reasons.get(key, 0) + 1


def corpus_cache_dir(cache: str | Path, corpus_name: str) -> Path:
    return Path(cache) / corpus_name


def store_path(cache_dir: Path, modality: str, spec: dict) -> Path:
    return cache_dir / f"{modality}-{tag(spec)}"


def write_corpus_index(corpus: Corpus, cache_dir: Path) -> None:
    """utterances.jsonl (ids, splits, labels) and protocol.json sit beside the stores."""
    write_utterances(corpus.utterances, cache_dir / "utterances.jsonl")
    (cache_dir / "protocol.json").write_text(json.dumps(asdict(corpus.protocol), indent=2))


def extract_corpus(cfg, corpus: Corpus, progress: bool = True, log=print) -> list[ModalityResult]:
    """cfg is a Config. Extract every modality named in cfg.extract.encoders."""
    if not cfg.extract.encoders:
        raise UserError("the config names no encoders (extract.encoders: {text: {backend: minilm}, ...})")
    cache_dir = corpus_cache_dir(cfg.extract.cache, corpus.name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_corpus_index(corpus, cache_dir)
    results = []
    for modality, spec in cfg.extract.encoders.items():
        encoder = build_encoder(modality, spec)
        budget = cfg.extract.batch_budget.get(modality, 1 << 30)
        results.append(extract_modality(
            corpus.utterances, encoder, cache_dir, budget=budget, workers=cfg.extract.workers,
            shard_bytes=int(cfg.extract.shard_mb * (1 << 20)), retry_failures=cfg.extract.retry_failures,
            progress=progress, log=log))
    return results


def extract_modality(utterances: list[Utterance], encoder: Encoder, cache_dir: Path, budget: int,
                     workers: int = 2, shard_bytes: int = 64 << 20, retry_failures: bool = False,
                     writer_name: str = "local", progress: bool = True, log=print) -> ModalityResult:
    modality = encoder.modality
    spec = encoder.full_spec()
    store = FeatureStore.create(store_path(cache_dir, modality, spec), modality, spec, fingerprint(spec),
                                dim=encoder.dim, layers=encoder.layers_out, fps=encoder.fps)
    result = ModalityResult(modality, str(store.path))
    done = set(store.ids())
    if not retry_failures:
        earlier = set(store.failures()) - done
        result.failed_before = sum(1 for u in utterances if u.id in earlier)
        done |= earlier
    todo = [u for u in utterances if u.id not in done]
    result.skipped = len(utterances) - len(todo)
    store.close()
    if not todo:
        log(f"{modality}: all {len(utterances)} utterances already in {store.path} (skipped, no encoder work)")
        return result
    if result.skipped:
        log(f"{modality}: skipping {result.skipped} utterances already done, encoding {len(todo)}")

    start = time.perf_counter()
    windows = window_plan(utterances, encoder.window_utterances)
    with store.writer(writer_name, shard_bytes) as writer, \
            tqdm(total=len(todo), desc=f"extract {modality}", unit="utt", disable=not progress) as bar:
        encode_windows(encoder, windows, done, budget, writer, result, workers, advance=bar.update)
    result.seconds = time.perf_counter() - start
    return result


def window_plan(utterances: list[Utterance], size: int) -> list[list[Utterance]]:
    """`utterances` in their given order, cut into windows of `size`: the first cut of the batch
    plan. Always cut from every utterance of the corpus (or of a chunk that starts on a window
    boundary), never from the ones still to do: a resumed run then meets the windows, and so the
    batches, of an uninterrupted one."""
    return [utterances[i : i + size] for i in range(0, len(utterances), size)]


def encode_windows(encoder: Encoder, windows: list[list[Utterance]], done: set[str], budget: int, writer,
                   result: ModalityResult, workers: int = 2, advance=lambda n: None) -> None:
    """Prepare, batch and encode each window that holds an utterance not in `done`, and write (or
    record as failed) only those. A window entirely done is skipped; a partly done one is prepared
    whole, so that its length batches are the ones an uninterrupted run formed, and of those only
    the batches holding an utterance still to do are encoded. Nothing in `done` is written, nor its
    failure recorded or counted, again. `advance(n)`: n utterances of the window were handled."""
    windows = [w for w in windows if any(u.id not in done for u in w)]
    if not windows:
        return
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending = [pool.submit(_prepare, encoder, u) for u in windows[0]]
        for k, window in enumerate(windows):
            prepared = [f.result() for f in pending]
            if k + 1 < len(windows):  # overlap: CPU preparation of the next window runs during encoding
                pending = [pool.submit(_prepare, encoder, u) for u in windows[k + 1]]
            ready = []
            for utt, item in prepared:
                if not isinstance(item, PrepareError):
                    ready.append((utt, item))
                elif utt.id not in done:
                    _fail(writer, result, utt, item.stage, item.reason)
            _encode_window(encoder, ready, budget, writer, result, done)
            advance(sum(1 for u in window if u.id not in done))


def _prepare(encoder: Encoder, utt: Utterance):
    try:
        if encoder.modality in utt.unusable:
            raise PrepareError("decode", utt.unusable[encoder.modality])
        return utt, encoder.prepare(utt)
    except PrepareError as e:
        return utt, e


def _encode_window(encoder: Encoder, ready: list, budget: int, writer, result: ModalityResult,
                   done: set[str]) -> None:
    sizes = [encoder.size(item) for _, item in ready]
    for batch in length_batches(sizes, budget):
        utts = [ready[i][0] for i in batch]
        if all(u.id in done for u in utts):
            continue  # written by an earlier run, from this very batch
        items = [ready[i][1] for i in batch]
        try:
            outputs = encoder.encode(items)
        except PrepareError as e:
            outputs = [e] * len(items) if len(items) == 1 else _encode_one_by_one(encoder, items)
        except RuntimeError:
            # One bad item (or memory) should not sink its batch mates: retry them alone.
            outputs = _encode_one_by_one(encoder, items)
        for utt, out in zip(utts, outputs):
            if utt.id in done:
                continue  # only a batch mate here: stored (or failed) by an earlier run
            if isinstance(out, Exception):
                _fail(writer, result, utt, getattr(out, "stage", "encode"), getattr(out, "reason", str(out)))
                continue
            try:
                writer.add(utt.id, out)
                result.encoded += 1
            except ValueError as e:  # NaN / Inf in the output
                _fail(writer, result, utt, "encode", str(e).split(": ", 1)[-1])


def _encode_one_by_one(encoder: Encoder, items: list) -> list:
    outputs = []
    for item in items:
        try:
            outputs.append(encoder.encode([item])[0])
        except (PrepareError, RuntimeError) as e:
            outputs.append(e)
    return outputs


def _fail(writer, result: ModalityResult, utt: Utterance, stage: str, reason: str) -> None:
    writer.add_failure(utt.id, stage, reason)
    count_failure(result, utt, stage, reason)
