"""Corpus readers. Each module turns a corpus on disk into Utterance records and its protocol."""

from __future__ import annotations

from pathlib import Path

from emofuse.corpora.base import Corpus
from emofuse.errors import UserError


def load_corpus(cfg, progress: bool = True) -> Corpus:
    """cfg is a CorpusConfig. The demo corpus is generated on first use; real corpora must exist."""
    root = Path(cfg.root)
    if cfg.name == "demo":
        from emofuse.corpora import demo

        demo.generate(root, size=cfg.size, seed=cfg.seed, progress=progress)
        return demo.load(root)
    raise UserError(f"unknown corpus {cfg.name!r} (available: demo)")
