"""Length bucketing: group items of similar size so that padding wastes little compute."""

from __future__ import annotations


def length_batches(sizes: list[int], budget: int, max_items: int = 64) -> list[list[int]]:
    """Indices of `sizes` grouped into batches whose padded cost (longest item x count) stays
    within `budget`. Items are sorted by size first, so each batch holds similar lengths.
    An item larger than the budget on its own gets a batch of its own (the encoder chunks it)."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        longest = max(sizes[i], max((sizes[j] for j in batch), default=0))
        if batch and (longest * (len(batch) + 1) > budget or len(batch) >= max_items):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches
