"""Corpus readers. Each module turns a corpus on disk into Utterance records and its protocol:

    load(root: Path, protocol: str = "", **options) -> Corpus
"""

from __future__ import annotations

import importlib
from pathlib import Path

from emofuse.corpora.base import Corpus
from emofuse.errors import UserError

# corpus name -> module of emofuse.corpora
READERS = {"demo": "demo", "meld": "meld", "mosi": "cmu", "mosei": "cmu", "iemocap": "iemocap",
           "emodb": "emodb", "ravdess": "ravdess", "manifest": "manifest"}


def load_corpus(cfg, progress: bool = True) -> Corpus:
    """cfg is a CorpusConfig. The demo corpus is generated on first use; real corpora must exist."""
    root = Path(cfg.root)
    if cfg.name not in READERS:
        raise UserError(f"unknown corpus {cfg.name!r} (available: {', '.join(sorted(READERS))})")
    module = importlib.import_module(f"emofuse.corpora.{READERS[cfg.name]}")
    if cfg.name == "demo":
        module.generate(root, size=cfg.size, seed=cfg.seed, progress=progress)
        return module.load(root)
    if not root.exists():
        raise UserError(f"corpus root {root} does not exist (set corpus.root=/path/to/{cfg.name})")
    options = dict(cfg.options)
    if cfg.name in ("mosi", "mosei"):  # one reader for both CMU corpora
        options["name"] = cfg.name
    return module.load(root, protocol=cfg.protocol, **options)


def corpus_folds(cfg) -> list:
    """The folds of a cross-validated protocol (e.g. Emo-DB's test speakers, IEMOCAP's sessions)."""
    module = importlib.import_module(f"emofuse.corpora.{READERS.get(cfg.name, cfg.name)}")
    folds = module.folds(Path(cfg.root), cfg.protocol) if hasattr(module, "folds") else []
    if not folds:
        raise UserError(f"corpus {cfg.name!r} (protocol {cfg.protocol or 'default'}) has no folds; train without --folds")
    return folds
