"""The SSE-FT fusion transformer (Siriwardhana et al. 2020), over cached features.

Read top to bottom:
  FusionConfig  - every hyper-parameter, JSON round-trip
  helpers       - masked pooling in time, fitting a sequence into the learned positions
  Block         - one post-LN transformer layer (self- or cross-modal attention + FFN)
  EncoderLayer  - one layer of a pretrained encoder (BERT-, wav2vec2-style), to train it from the cache
  Stream        - one modality: layer mix (or the encoder's own top layers) -> pooling -> (fast)
                  projection -> start token
                  -> positions -> LayerNorm -> dropout -> self-attention layers
  CrossStack    - query modality attends to a source modality, layer by layer
  SSEFT         - streams, the six directional cross stacks, Hadamard pooling, (statistics
                  pooling,) head

Shapes: B batch, T frames, L encoder layers, D feature width, W model width of a modality.
Masks are True for a real frame. A modality can be absent for a sample (`present`):
it is then masked out of attention (only its start token stays attendable, so no softmax
row is ever all masked) and its pooled vector is zeroed before the head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emofuse.errors import UserError

MODALITIES = ("audio", "text", "video")  # canonical order: columns of `present`, order of the concat

# The six directional cross stacks of the paper, (query, source): query attends to source.
CROSS_PAIRS = (
    ("text", "audio"),
    ("audio", "text"),
    ("audio", "video"),
    ("video", "audio"),
    ("text", "video"),
    ("video", "text"),
)


# Each preset is a complete architecture; a knob set in the config overrides its preset's value
# (per-modality dicts key by key).
#   paper: the SSE-FT model, every modality at its encoder's native width (RoBERTa-large 1024, ...).
#   fast:  every modality projected to `width`, one self and one cross layer, audio pooled 8x and
#          video 2x in time, no attention dropout: an experiment on a MOSEI-sized cache in minutes
#          on a CPU (bench/training.py). Attention dropout masks were ~40% of a CPU step.
PRESETS = {
    "paper": dict(width=128, self_layers={"audio": 2, "text": 0, "video": 2}, cross_layers=2, heads=4, ffn=1024,
                  dropout=0.1, attn_dropout=0.1, pool_stride={"audio": 1, "text": 1, "video": 1}, max_positions=512,
                  stats_pool=False, unfreeze_top={"audio": 0, "text": 0, "video": 0}),
    "fast": dict(width=128, self_layers={"audio": 1, "text": 0, "video": 1}, cross_layers=1, heads=4, ffn=512,
                 dropout=0.1, attn_dropout=0.0, pool_stride={"audio": 8, "text": 1, "video": 2}, max_positions=512,
                 stats_pool=False, unfreeze_top={"audio": 0, "text": 0, "video": 0}),
}


@dataclass
class Architecture:
    """The knobs a user sets (the `model:` section of a config, see emofuse/config.py).
    None = the preset's value (PRESETS), filled in on construction."""

    preset: str = "fast"  # a key of PRESETS
    width: Optional[int] = None  # model width of every modality (fast); paper keeps native widths
    self_layers: Optional[dict[str, int]] = None  # self-attention layers per modality
    cross_layers: Optional[int] = None  # layers of each of the six cross-modal stacks
    heads: Optional[int] = None
    ffn: Optional[int] = None
    dropout: Optional[float] = None
    attn_dropout: Optional[float] = None
    pool_stride: Optional[dict[str, int]] = None  # mean-pool this many frames into one, per modality
    max_positions: Optional[int] = None  # learned positions, start token included; longer inputs are mean-pooled
    # Statistics pooling: the head also reads each modality's masked mean and standard deviation over
    # its self-attended frames (2W more inputs per modality; x-vector style), besides position 0.
    stats_pool: Optional[bool] = None
    # Train the encoder's own top N layers of a modality here, started from its pretrained weights,
    # on the cached hidden state below them (the cache must keep every layer: `layer: all`). The
    # layers under them stay frozen and cached, so this is partial fine-tuning that still trains
    # from the cache. Post-LN encoders of the hf and minilm backends (BERT, RoBERTa, MiniLM;
    # wav2vec2-base, HuBERT-base, data2vec-audio-base); 0 = the learned layer mix.
    unfreeze_top: Optional[dict[str, int]] = None

    def __post_init__(self):
        defaults = PRESETS.get(self.preset)
        if defaults is None:  # config.check_values / FusionConfig name the problem
            return
        for key, value in defaults.items():
            mine = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, value | dict(mine or {}))
            elif mine is None:
                setattr(self, key, value)


@dataclass(kw_only=True)
class FusionConfig(Architecture):
    """Architecture + what the data decides: modalities, their cached widths and layers, outputs."""

    modalities: list[str]  # subset of MODALITIES, in canonical order
    input_dims: dict[str, int]  # D of each modality's cached features
    num_layers_in: dict[str, int]  # L of each cache: 1 = (T, D); >1 = (T, L, D), learned softmax layer mix
    num_outputs: int
    # Per modality with unfreeze_top: the encoder layer's shape (EncoderLayer's arguments), read
    # from the encoder's config when training starts; the weights then travel in the checkpoint.
    encoder_layer: dict[str, dict] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise UserError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        super().__post_init__()
        self.modalities = list(self.modalities)
        if not self.modalities or any(m not in MODALITIES for m in self.modalities):
            raise UserError(
                f"modalities must be a non-empty subset of {list(MODALITIES)}, got {self.modalities}"
            )
        canonical = [m for m in MODALITIES if m in self.modalities]
        if self.modalities != canonical:
            raise UserError(f"modalities must be in canonical order {canonical}, got {self.modalities}")
        self.num_layers_in = {m: 1 for m in self.modalities} | dict(self.num_layers_in)
        for m in self.modalities:
            if m not in self.input_dims:
                raise UserError(f"input_dims has no entry for modality {m!r}")
            if self.num_layers_in[m] < 1 or self.pool_stride[m] < 1 or self.self_layers[m] < 0:
                raise UserError(f"{m}: num_layers_in and pool_stride must be >= 1, self_layers >= 0")
            if self.width_of(m) % self.heads:
                raise UserError(f"{m}: width {self.width_of(m)} is not divisible by heads={self.heads}")
            n_top = self.unfreeze_top.get(m, 0)
            if n_top < 0:
                raise UserError(f"unfreeze_top.{m} must be >= 0, got {n_top}")
            if n_top and self.num_layers_in[m] <= n_top:
                raise UserError(
                    f"unfreeze_top.{m}={n_top} needs the hidden state below the encoder's top {n_top} layers: "
                    f"cache every layer (extract.encoders.{m}.layer: all); this cache has {self.num_layers_in[m]}"
                )
            if n_top and self.encoder_layer.get(m, {}).get("width") != self.input_dims[m]:
                raise UserError(f"unfreeze_top.{m}: no encoder layer shape of width {self.input_dims[m]} given")
        if self.max_positions < 2:
            raise UserError("max_positions must be >= 2 (start token + at least one frame)")

    def width_of(self, modality: str) -> int:
        """Model width W of a modality: its native feature width (paper) or `width` (fast)."""
        return self.input_dims[modality] if self.preset == "paper" else self.width

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FusionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown fusion model setting(s): {', '.join(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------- helpers


def pool_time(x: Tensor, mask: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Masked mean over non-overlapping windows of `stride` frames: (B, T, D) -> (B, ceil(T/stride), D).

    x must be zero where mask is False (Stream zeroes padding first), so a window's sum is a plain
    sum: one pass over x, no copy. Windows start at frame 0, so padding appended at the end never
    changes a real window.
    """
    if stride == 1:
        return x, mask
    B, T, D = x.shape
    whole = T // stride * stride
    sums = x[:, :whole].reshape(B, whole // stride, stride, D).sum(2)
    counts = mask[:, :whole].reshape(B, whole // stride, stride).sum(2)
    if whole < T:  # the last, shorter window
        sums = torch.cat([sums, x[:, whole:].sum(1, keepdim=True)], dim=1)
        counts = torch.cat([counts, mask[:, whole:].sum(1, keepdim=True)], dim=1)
    return sums / counts.clamp(min=1)[..., None].to(x.dtype), counts > 0


def fit_length(x: Tensor, mask: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """Mean-pool each sample's real frames into at most `max_len` bins (never crop).

    Per sample, the n real frames (in order) go to bin floor(rank * max_len / n) when n > max_len,
    else to bin rank. This depends only on the sample itself, not on the batch's padded length.
    """
    B, T, D = x.shape
    if T <= max_len:
        return x, mask
    n = mask.sum(1, keepdim=True)  # (B, 1) real frames per sample
    rank = mask.long().cumsum(1) - 1  # position of each real frame among the real ones
    bins = torch.where(n > max_len, rank * max_len // n.clamp(min=1), rank)
    bins = torch.where(mask, bins, 0)  # padding goes to bin 0 with weight 0
    w = mask.to(x.dtype)
    sums = x.new_zeros(B, max_len, D).scatter_add_(1, bins[..., None].expand(-1, -1, D), x * w[..., None])
    counts = x.new_zeros(B, max_len).scatter_add_(1, bins, w)
    return sums / counts.clamp(min=1)[..., None], counts > 0


def stats_pool(x: Tensor, mask: Tensor) -> Tensor:
    """Masked mean and standard deviation over time: (B, T, W) -> (B, 2W); zeros for no real frame."""
    w = mask[..., None].to(x.dtype)
    n = w.sum(1).clamp(min=1)
    mean = (x * w).sum(1) / n
    var = (((x - mean[:, None]) ** 2) * w).sum(1) / n
    return torch.cat([mean, (var + 1e-5).sqrt()], dim=-1) * (mask.any(1)[:, None].to(x.dtype))


# --------------------------------------------------------------------------- layers


class Dropout(nn.Module):
    """nn.Dropout with a cheaper random mask on the CPU. torch's CPU bernoulli_ draws one number
    per element (~8 ns each: ~40% of a `fast` training step); here each 64-bit draw of torch's
    generator gives four 16-bit uniforms, 3x faster. An element is kept with probability
    1 - round(p * 65536) / 65536 (p to within 1e-5) and scaled by its inverse, as nn.Dropout does.
    Seeded by torch's generator like nn.Dropout, so runs and `train --resume` stay reproducible."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        if self.p >= 1:
            return x * 0.0
        drop = min(round(self.p * 65536), 65535)
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        uniform = bits.view(torch.int16)[:n].view(x.shape)  # each of the 65,536 values equally likely
        keep = uniform >= -32768 + drop
        return x * keep * (65536 / (65536 - drop))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """One post-LN transformer layer: x = LN(x + Attn(x, kv)); x = LN(x + FFN(x)).

    Self-attention when kv is x itself; cross-modal attention when kv is another modality's
    stream, whose keys/values are projected from its own width (kv_width) to this width.
    Written out (not nn.TransformerEncoderLayer) to have an attention dropout of its own.
    """

    def __init__(self, width: int, kv_width: int, heads: int, ffn: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(
            width, heads, dropout=attn_dropout, kdim=kv_width, vdim=kv_width, batch_first=True
        )
        self.norm1 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), Dropout(dropout), nn.Linear(ffn, width))
        self.norm2 = nn.LayerNorm(width)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, kv: Tensor, kv_valid: Tensor) -> Tensor:
        a, _ = self.attn(x, kv, kv, key_padding_mask=~kv_valid, need_weights=False)
        x = self.norm1(x + self.drop(a))
        return self.norm2(x + self.drop(self.ffn(x)))


class EncoderLayer(nn.Module):
    """One layer of a post-LN transformer encoder: self-attention and a GELU FFN, the computation of
    transformers' BertLayer (BERT, RoBERTa, MiniLM) and Wav2Vec2EncoderLayer (wav2vec2-base,
    HuBERT-base), written out so that the encoder's own weights load into it (names:
    HFEncoder.top_layers) and train inside the fusion model (unfreeze_top)."""

    def __init__(self, width: int, heads: int, ffn: int, eps: float, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.up, self.down = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, keys: Tensor) -> Tensor:
        """x (B, T, W); keys (B, T) True = a position every query may attend to."""
        B, T, W = x.shape

        def split(t: Tensor) -> Tensor:  # (B, T, W) -> (B, heads, T, W / heads)
            return t.view(B, T, self.heads, -1).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=keys[:, None, None, :],
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        x = self.norm1(x + self.drop(self.out(a.transpose(1, 2).reshape(B, T, W))))
        return self.norm2(x + self.drop(self.down(F.gelu(self.up(x)))))


class Stream(nn.Module):
    """One modality from cached features to its self-attended sequence (B, 1 + T', W).

    Position 0 is a learned start token: the pooling slot, and always a valid key.
    """

    def __init__(self, cfg: FusionConfig, m: str):
        super().__init__()
        d, w, n_layers = cfg.input_dims[m], cfg.width_of(m), cfg.num_layers_in[m]
        self.stride = cfg.pool_stride[m]
        self.max_frames = cfg.max_positions - 1  # one position is the start token's
        # The encoder's own top layers (unfreeze_top) run on the cached hidden state below them...
        n_top = cfg.unfreeze_top.get(m, 0)
        self.encoder_top = nn.ModuleList(EncoderLayer(**cfg.encoder_layer[m]) for _ in range(n_top))
        self.top_input = n_layers - 1 - n_top  # index of that state in (T, L, D): L = embeddings + layers
        # ...or a SUPERB-style weighted sum of the encoder's layers; zeros = equal weights after softmax.
        self.layer_logits = nn.Parameter(torch.zeros(n_layers)) if n_layers > 1 and not n_top else None
        self.proj = nn.Linear(d, w) if cfg.preset == "fast" else nn.Identity()
        self.start = nn.Parameter(torch.randn(w) * 0.02)
        self.positions = nn.Parameter(torch.randn(cfg.max_positions, w) * 0.02)
        self.norm = nn.LayerNorm(w)
        self.drop = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            Block(w, w, cfg.heads, cfg.ffn, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.self_layers[m])
        )

    def layer_weights(self) -> Tensor | None:
        return None if self.layer_logits is None else self.layer_logits.softmax(0)

    def forward(self, x: Tensor, mask: Tensor, start_only: bool = False) -> tuple[Tensor, Tensor]:
        """x (B, T, D) or (B, T, L, D); mask (B, T) -> stream (B, 1 + T', W), valid (B, 1 + T').

        start_only: the caller reads position 0 only (a single-modality model), so the last layer
        is computed for the start token alone; the stream returned is then (B, 1, W)."""
        # Zero padding and absent samples first: garbage (even NaN) must not reach any sum. A multiply
        # is 4x faster than torch.where on a CPU (where was 13% of a `fast` step) but keeps NaN * 0 = NaN;
        # a non-finite sum catches that (one cheap reduction), and then where does it properly. (A
        # meta tensor, as FLOP counting uses, has no values to check.)
        wide_mask = mask.view(*mask.shape, *[1] * (x.dim() - 2))
        zeroed = x.to(self.start.dtype) * wide_mask
        if not zeroed.is_meta and not torch.isfinite(zeroed.sum()):
            zeroed = torch.where(wide_mask, x.to(self.start.dtype), 0.0)
        x = zeroed
        if self.encoder_top:
            x = x[:, :, self.top_input]
            # an absent sample attends to its zeros: some attention kernels give NaN for a row with no key
            keys = mask | ~mask.any(1, keepdim=True)
            for layer in self.encoder_top:
                x = layer(x, keys)
            x = x * mask[..., None]
        elif self.layer_logits is not None:
            x = torch.einsum("btld,l->btd", x, self.layer_weights())
        # Masked means commute with the (affine) projection, so pooling before it is the same, and cheaper.
        x, mask = pool_time(x, mask, self.stride)
        x, mask = fit_length(x, mask, self.max_frames)
        x = self.proj(x)
        start = self.start.expand(x.shape[0], 1, -1)
        if not self.layers:
            # With no self layers nothing would ever write into the start token: position 0 would be a
            # constant, so this modality's own cross streams (and a single-modality model) would not
            # see it. The paper's text stream had RoBERTa's contextual <s> there; we give the start
            # token the masked mean of the frames (zero for an absent sample) to play that role.
            mean = (x * mask[..., None]).sum(1, keepdim=True) / mask.sum(1).clamp(min=1)[:, None, None]
            start = start + mean
        x = torch.cat([start, x], dim=1)
        valid = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        x = self.drop(self.norm(x + self.positions[: x.shape[1]]))
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            x = layer(x[:, :1] if start_only and last else x, x, valid)
        return x, valid


class CrossStack(nn.Module):
    """Query modality attends to a source modality; the query stream is updated layer by layer,
    the source's keys/values stay fixed (the source's self-attended stream).

    Only position 0 of the output is used (the pooled vector), and attention and FFN act per query
    position, so the last layer is computed for position 0 alone: the same result, and with one
    cross layer the stack costs one query row instead of T (the `fast` step ran ~2x faster)."""

    def __init__(self, cfg: FusionConfig, query: str, source: str):
        super().__init__()
        wq, ws = cfg.width_of(query), cfg.width_of(source)
        self.layers = nn.ModuleList(
            Block(wq, ws, cfg.heads, cfg.ffn, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.cross_layers)
        )

    def forward(self, q: Tensor, kv: Tensor, kv_valid: Tensor) -> Tensor:
        """q (B, 1 + Tq, Wq) -> the pooled position after every layer, (B, 1, Wq)."""
        for i, layer in enumerate(self.layers):
            q = layer(q[:, :1] if i == len(self.layers) - 1 else q, kv, kv_valid)
        return q[:, :1]


# --------------------------------------------------------------------------- the model


class SSEFT(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.streams = nn.ModuleDict({m: Stream(cfg, m) for m in cfg.modalities})
        self.pairs = [(q, s) for q, s in CROSS_PAIRS if q in cfg.modalities and s in cfg.modalities]
        self.cross = nn.ModuleDict({f"{q}_to_{s}": CrossStack(cfg, q, s) for q, s in self.pairs})
        fused = sum(cfg.width_of(m) for m in cfg.modalities) * (3 if cfg.stats_pool else 1)
        self.head = nn.Sequential(
            Dropout(cfg.dropout),
            nn.Linear(fused, fused),
            nn.Tanh(),
            Dropout(cfg.dropout),
            nn.Linear(fused, cfg.num_outputs),
        )

    def forward(
        self,
        features: dict[str, Tensor],
        masks: dict[str, Tensor],
        present: Tensor | dict[str, Tensor] | None = None,
    ) -> Tensor:
        """features[m] (B, T, D) or (B, T, L, D); masks[m] (B, T) bool, True = real frame;
        present (B, M) bool in cfg.modalities order, or {m: (B,)}; None = all present.
        A modality missing from `features` is absent for the whole batch. Returns logits (B, num_outputs).
        """
        cfg = self.cfg
        if not any(m in features for m in cfg.modalities):
            raise ValueError(f"no features for any of {cfg.modalities}")
        B = next(iter(features.values())).shape[0]
        device = next(iter(features.values())).device
        present = self._present(present, B, device)

        streams, valids, here = {}, {}, {}
        for i, m in enumerate(cfg.modalities):
            if m in features:
                x, mask = features[m], masks[m].bool()
                self._check(m, x, mask)
            else:  # one zero frame stands in; the sample mask below removes it
                L, D = cfg.num_layers_in[m], cfg.input_dims[m]
                x = torch.zeros(B, 1, *((D,) if L == 1 else (L, D)), device=device)
                mask = torch.zeros(B, 1, dtype=torch.bool, device=device)
            # A modality with no real frame for a sample counts as absent for it.
            here[m] = present[:, i] & mask.any(1)
            # A stream that is no other modality's keys/values (nor pooled over time) is read at position 0 only.
            start_only = not self.pairs and not cfg.stats_pool
            streams[m], valids[m] = self.streams[m](x, mask & here[m][:, None], start_only)

        pooled = []
        for m in cfg.modalities:
            outs = [
                self.cross[f"{q}_to_{s}"](streams[q], streams[s], valids[s])[:, 0]  # pool position 0
                for q, s in self.pairs
                if q == m
            ]
            if not outs:  # single-modality model: no cross stacks
                outs = [streams[m][:, 0]]
            v = outs[0]
            for o in outs[1:]:  # Hadamard product of this modality's cross outputs
                v = v * o
            pooled.append(v * here[m][:, None].to(v.dtype))  # absent -> zero vector
        if cfg.stats_pool:
            for m in cfg.modalities:
                s = stats_pool(streams[m][:, 1:], valids[m][:, 1:])
                pooled.append(s * here[m][:, None].to(s.dtype))  # absent -> zero vector
        return self.head(torch.cat(pooled, dim=-1))

    def _present(self, present, B: int, device) -> Tensor:
        M = len(self.cfg.modalities)
        if present is None:
            return torch.ones(B, M, dtype=torch.bool, device=device)
        if isinstance(present, dict):
            everyone = torch.ones(B, dtype=torch.bool, device=device)
            present = torch.stack([present.get(m, everyone).to(device) for m in self.cfg.modalities], dim=1)
        if tuple(present.shape) != (B, M):
            raise ValueError(
                f"present must be (batch, {M}) for {self.cfg.modalities}, got {tuple(present.shape)}"
            )
        return present.to(device=device, dtype=torch.bool)

    def _check(self, m: str, x: Tensor, mask: Tensor) -> None:
        L, D = self.cfg.num_layers_in[m], self.cfg.input_dims[m]
        want = (D,) if L == 1 else (L, D)
        if tuple(x.shape[2:]) != want or x.dim() != 2 + len(want):
            want_s = ", ".join(map(str, want))
            raise ValueError(f"{m}: features must be (B, T, {want_s}), got {tuple(x.shape)}")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{m}: mask {tuple(mask.shape)} does not match features {tuple(x.shape[:2])}")

    def layer_weights(self) -> dict[str, list[float]]:
        """Softmax layer-mix weights of the modalities whose cache keeps several layers."""
        return {
            m: s.layer_weights().tolist() for m, s in self.streams.items() if s.layer_weights() is not None
        }

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
