"""The benchmarks' own measuring tools, where a wrong number would go unnoticed in a result file."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402


def test_flop_count_includes_attention_on_the_cpu():
    # The fraction of the FLOP limit in bench/results divides by these counts. torch's counter had no
    # formula for the CPU attention kernel, so a CPU forward counted attention as zero FLOPs.
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    model = Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=2)).eval()
    x = torch.randn(1, 16000 * 3)
    counts = {}
    for implementation in ("eager", "sdpa"):  # eager attention is two torch.matmul calls, counted as bmm
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            counts[implementation] = common.count_flops(lambda: model(x))
    assert counts["sdpa"] == counts["eager"]

    q, k, v = (torch.randn(2, 4, 50, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 50, 50, dtype=torch.bool)
    forward = common.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert forward == 2 * (2 * 2 * 4 * 50 * 50 * 8)  # two batched products of 2 * m * n * k FLOPs each
    both = common.count_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward())
    assert both == forward * 3.5  # torch's backward formula: 2.5x the forward (it recomputes the scores)
