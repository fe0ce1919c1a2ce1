"""Any transformers encoder in a local folder: audio (wav2vec2, HuBERT, WavLM, data2vec-audio) or text
(BERT, RoBERTa, MiniLM, ...). Nothing is downloaded: the folder must already hold the model.

Batching: an utterance's features never depend on its batch mates beyond float rounding (within
1e-5 of encoding it alone), and are bit-identical whenever the batch plan is the same, which the
pipeline guarantees for the same corpus and config (see PAD_MULTIPLE).
- Text models and audio models take an attention mask: a batch is padded (text: not at all, see
  PAD_MULTIPLE) and masked, and each utterance's rows are cut back to its own length.
- Audio models run their conv feature encoder through conv_features.ChannelsLastFeatureEncoder
  (channels last, convs as matmuls: ~3x faster in bf16 on a CPU). In a group-norm feature encoder
  (feat_extract_norm="group", e.g. wav2vec2-base, HuBERT-base) transformers' GroupNorm would
  average over the padding too, which is why HF says not to pad or mask such models; ours takes
  each input's statistics from its own samples, so they batch like the others. Should a model's
  conv layers be of another kind, transformers' encoder stays, and a group-norm model's inputs
  are then batched only with inputs of exactly the same length.

Long inputs are cut into overlapping windows and stitched (see chunking.py), never truncated.

Precision: float32 matches transformers within 1e-5. bf16 runs under autocast with the weights cast
once (precast_for_autocast); on a CPU the Linear layers then use oneDNN-packed weights
(PackedLinear), where the torch build supports it, each feed-forward block's first Linear applying
its GELU itself (fuse_gelu), and the spec's linear_kernel says so; an audio model's self-attention
then runs as PackedSelfAttention (spec: attention) and its grouped convs as ChannelsLastConv1d
(bit-identical).
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from emofuse.corpora.base import Utterance
from emofuse.errors import PrepareError, UserError
from emofuse.extract.encoders.base import Encoder, file_sha256, register
from emofuse.extract.encoders.chunking import chunk_spans, conv_output_length, stitch
from emofuse.extract.encoders.conv_features import (
    is_exact_gelu,
    tile_frames_for,
    use_channels_last_feature_encoder,
)
from emofuse.extract.media import load_audio

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
# Padded input per forward: a long input cut into many windows is run a few windows at a time, so
# memory stays that of an ordinary batch (100,000 words in one forward of 530 windows took 3.5 GB).
# A batch the pipeline formed is never split, whatever its budget (see encode).
FORWARD_BUDGET = {"text": 8192, "audio": 16000 * 60}
# Masked audio is padded to the longest input of its forward, rounded up to a multiple of
# PAD_MULTIPLE samples (0.25 s at 16 kHz), and a pipeline batch is one forward unless that would
# pad more than MAX_PADDING; AUDIO_PADDING names that policy in the spec. Each input padded by its
# own length alone, as before, made 75 forwards of 200 clips of 2-15 s on an H200, where ~17 ms
# of host time per forward (Python, ~440 kernel launches) left the GPU mostly idle; one forward
# per batch made 33, 39 with the cut (bench/README.md, "GPU profile").
# Text is not padded at all: a forward holds texts (or windows of long texts) of exactly one
# length. With exact lengths an utterance's features change in the last bits with how many others
# share its forward (matrix kernels block odd sizes differently: 46 of 4,992 values by 1 ulp in the
# kill-loop test), which used to break resume; text was padded to multiples of 16 for that, at a
# cost of 35.5% padded positions on MELD's short transcripts (24.6% on the demo corpus) and of
# speed (exact lengths extract MELD's text 1.44x faster: bench/text_padding.py). Exact lengths are
# safe now because the batch plan is fixed (pipeline.window_plan): windows are cut from the whole
# corpus, never from what is left to do, so the same corpus and config give the same batches,
# hence bit-identical features, in an uninterrupted run, after any number of kills and resumes,
# and across dask workers, given the same torch thread count and device (with exact lengths the
# thread count shows in the last bits too: 1 and 2 threads differ in 1,558 of 226,944 float16
# values on the demo transcripts, none at multiples of 16). Against encoding an utterance alone,
# with other batch mates (another batch budget) or another thread count, features agree within
# 1e-5, not bit for bit.
# TEXT_PADDING names this policy in the encoder spec: stores made under another one (multiples of
# 16, no "padding" in their spec) get another fingerprint, so a store never mixes the two.
PAD_MULTIPLE = {"text": 1, "audio": 4000}
TEXT_PADDING = "exact"
# A forward is cut where padding to its longest would make more than this share of it padding: a
# pipeline batch from a window of few clips can span seconds (the 25 clips per window of
# bench/extraction.py's fp32 rows padded 11.7% as one forward each). At the default 60 s budget,
# on 200 / 100 / 25 clips of 2-15 s in a window, 10% gives 39 / 21 / 10 forwards padding 3.0 / 4.3 /
# 4.9% in all (33 / 16 / 6 forwards, 3.9 / 5.8 / 11.1% without the cut; 60 / 38 / 16 at 5%).
MAX_PADDING = 0.10
AUDIO_PADDING = "longest in forward, multiple of 4000 samples, at most 10% padding"


def check_model_folder(path) -> Path:
    """The local model folder, or a UserError that says what to put where."""
    if not path:
        raise UserError("hf encoder: option 'path' (a local transformers model folder) is required")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"hf encoder: model folder {str(folder)!r} does not exist. Nothing is downloaded at run time: "
            f"put the transformers model there (config.json, model.safetensors or pytorch_model.bin, and "
            f"preprocessor_config.json for audio or the tokenizer files for text), e.g. on a machine with "
            f"internet: huggingface-cli download <model id> --local-dir {folder}"
        )
    if not (folder / "config.json").is_file():
        raise UserError(f"hf encoder: {folder / 'config.json'} not found; {folder} is not a transformers model folder")
    return folder


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"hf encoder: no weights in {folder} (expected model.safetensors or pytorch_model.bin)")
    return files


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@contextlib.contextmanager
def exact_float32(device: str):
    """Full float32 on a GPU: cuDNN convolutions default to TF32 (~1e-3 relative error, with a
    different algorithm per batch shape), which would make an utterance's features depend on its
    batch. Matmuls too, in case someone lowered the global precision."""
    if not device.startswith("cuda"):
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def freeze_weight_norm(model: torch.nn.Module) -> int:
    """Compute weight-normed weights once and store them as plain weights. A frozen model's
    g * v / ||v|| never changes, but the parametrisation recomputes it on every forward (the
    positional conv of wav2vec2-style models: ~2% of a bf16 wav2vec2-base forward on a CPU). The
    same op on the same tensors: the outputs do not change. Returns the number of layers frozen."""
    from torch.nn.utils import parametrize

    frozen = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            frozen += 1
        elif hasattr(module, "weight_g"):  # the older hook-based torch.nn.utils.weight_norm
            torch.nn.utils.remove_weight_norm(module)
            frozen += 1
    return frozen


def precast_for_autocast(model: torch.nn.Module, dtype) -> int:
    """Store the weights of Linear and Conv layers in the autocast dtype once, instead of letting
    autocast cast them on every forward (frozen weights are never cached by autocast: it caches
    only tensors that require grad). Autocast would feed exactly these bf16/fp16 copies to the
    same ops, so the outputs are bit-identical; on a CPU the recasting was ~38% of a wav2vec2-base
    forward. Layers whose weight is recomputed each call (weight norm) stay float32.
    Returns the number of layers converted."""
    converted = 0
    for module in model.modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            continue
        if hasattr(module, "weight_g") or hasattr(module, "parametrizations"):
            continue
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
        converted += 1
    return converted


class PackedLinear(torch.nn.Module):
    """A frozen bf16 Linear whose weight oneDNN has laid out once in its matmul kernel's blocked
    format. F.linear hands oneDNN the plain weight, which is reordered on every call; packed once,
    a bf16 wav2vec2-base forward ran ~1.2x faster on this project's AMX CPU (bench/README.md,
    "packed linears"). The kernel sums in another order than F.linear's, so outputs agree with
    autocast to bf16 rounding, not bit for bit (the spec says which kernel wrote a store).

    activation "gelu": the exact (erf) GELU that follows the Linear in a feed-forward block, applied
    by the kernel to its float32 sums before they are rounded (fuse_gelu)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # kept: models read weight.dtype
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.activation = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # autocast does not know this op: cast the input as it would for F.linear
        x = x.to(self.weight.dtype)
        if self.activation == "gelu":  # algorithm "none": the erf GELU, not the tanh approximation
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


@functools.cache  # one probe per process, not one per encoder
def onednn_packing_works() -> bool:
    """Whether this torch build packs bf16 linear weights for oneDNN (x86 builds with mkldnn and
    a CPU with bf16 support), checked on a tiny product with a known answer."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        linear = torch.nn.Linear(8, 3).to(torch.bfloat16).requires_grad_(False)
        linear.weight.fill_(0.5)
        linear.bias.fill_(1.0)
        out = PackedLinear(linear)(torch.ones(2, 5, 8))
        return out.dtype == torch.bfloat16 and bool(torch.equal(out, torch.full((2, 5, 3), 5.0, dtype=torch.bfloat16)))
    except (AttributeError, RuntimeError):
        return False


def replace_modules(model: torch.nn.Module, matches, replacement) -> int:
    """Replace each submodule m of model for which matches(m) by replacement(m). Returns how many."""
    replaced = 0
    for parent in list(model.modules()):  # a list first: the loop replaces children
        for name, child in list(parent.named_children()):
            if matches(child):
                setattr(parent, name, replacement(child))
                replaced += 1
    return replaced


def pack_linears(model: torch.nn.Module) -> int:
    """Replace each bf16 Linear of a frozen CPU model by a PackedLinear. Returns how many."""
    return replace_modules(model, lambda m: type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16,
                           PackedLinear)


PACKED, PACKED_FUSED_GELU = "onednn-packed", "onednn-packed, fused GELU"  # linear_kernel in the spec

# (Linear, activation) attribute names of a feed-forward block's first half: transformers'
# wav2vec2-style FeedForward (wav2vec2, HuBERT, WavLM, data2vec-audio) and BERT / RoBERTa's Intermediate
FEED_FORWARD_NAMES = (("intermediate_dense", "intermediate_act_fn"), ("dense", "intermediate_act_fn"))


def fuse_gelu(model: torch.nn.Module, names=FEED_FORWARD_NAMES, is_gelu=is_exact_gelu) -> int:
    """Let each PackedLinear that an exact GELU follows in a feed-forward block apply that GELU
    itself, and drop the separate GELU. Returns how many. names: the blocks' (Linear, activation)
    attribute names; is_gelu: whether an activation is the exact GELU.

    The separate GELU was a pass over the block's widest activations (4x the model width). Fused, a
    bf16 wav2vec2-base forward repeated on 2 CPU cores ran 1.04-1.07x faster and Emo-DB through the
    pipeline 0.99-1.07x. Over clips of 2-15 s, where nearly every forward has a new shape (and oneDNN
    builds the fused kernel anew): 1.01-1.05x cold and 1.05-1.08x warm in fresh processes, 0.96-0.97x
    in bench/ablation.py's two runs, so within this VM's noise there (bench/README.md, sessions 12
    and 13). One rounding to bf16 fewer brings it slightly closer to float32."""
    fused = 0
    for module in list(model.modules()):  # a list first: the loop replaces children (as replace_modules)
        for linear_name, act_name in names:
            linear = getattr(module, linear_name, None)
            if isinstance(linear, PackedLinear) and linear.activation == "none" and is_gelu(getattr(module, act_name, None)):
                linear.activation = "gelu"
                setattr(module, act_name, torch.nn.Identity())
                fused += 1
    return fused


# torch's CPU flash attention in bf16 ran ~2x slower when the number of keys was not a multiple of
# 4-16: 18.8 ms for 8 inputs x 12 heads x 381 frames against 8.7 ms with the keys padded to 384
# and masked (2 cores; bench/README.md, session 13). Multiples of 16 were fast at every length tried.
KEY_MULTIPLE = 16


class PackedSelfAttention(torch.nn.Module):
    """transformers' wav2vec2-style self-attention (Wav2Vec2Attention; HuBERT's and data2vec-audio's
    are copies of it) for a frozen bf16 model on a CPU: the same function, made faster in two ways:
    - q, k and v come from one PackedLinear three times as wide (one matmul, not three);
    - the keys and values are zero-padded to a multiple of KEY_MULTIPLE frames, with a key-only
      mask (each input's padding and the added frames): torch's CPU flash attention is ~2x slower
      at other key counts.
    Measured per layer at wav2vec2-base width on 2 CPU cores, 8 inputs padded to 381 frames: 20-24
    ms against transformers' 29-33; at 401 frames 24-26 against 25-26; 4 inputs of 712 frames: the
    same (bench/README.md, session 13). Outputs agree with the masked attention to bf16 rounding
    (the sums' order)."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        # kept as they were: top_layers() reads their weights
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj)
        self.num_heads, self.head_dim, self.scaling = attention.num_heads, attention.head_dim, attention.scaling
        self.qkv = packed_qkv(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        batch, frames, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, frames, 3, self.num_heads, self.head_dim)
        lengths = [frames] * batch if attention_mask is None else padding_lengths(attention_mask, frames)
        if lengths is None:  # a mask that is not just padding: as transformers computes it
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling)
        else:
            out = attend_padded_keys(qkv, lengths, self.scaling)
        return self.out_proj(out.transpose(1, 2).reshape(batch, frames, width)), None


def attend_padded_keys(qkv: torch.Tensor, lengths: list[int], scale: float) -> torch.Tensor:
    """Self-attention of a padded batch, qkv (B, T, 3, heads, head_dim) -> (B, heads, T, head_dim),
    input b attending to its first lengths[b] frames. The keys and values are copied out, zero-padded
    to a multiple of KEY_MULTIPLE frames (zeros: a masked key's weight is 0, but 0 x NaN would not
    be), with a key-only mask."""
    batch, frames, _, heads, head_dim = qkv.shape
    keys = -(-frames // KEY_MULTIPLE) * KEY_MULTIPLE
    kv = qkv.new_empty(2, batch, heads, keys, head_dim)
    kv[..., :frames, :] = qkv[:, :, 1:].permute(2, 0, 3, 1, 4)
    kv[..., frames:, :] = 0
    real = torch.arange(keys, device=qkv.device) < torch.tensor(lengths, device=qkv.device)[:, None]
    q = qkv[:, :, 0].transpose(1, 2)  # a strided view
    return torch.nn.functional.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=real[:, None, None, :], scale=scale)


def packed_qkv(q_proj, k_proj, v_proj) -> PackedLinear:
    """One PackedLinear computing [q, k, v] from three bf16 Linears (or PackedLinears) of one input."""
    qkv = torch.nn.Linear(q_proj.in_features, 3 * q_proj.out_features, dtype=q_proj.weight.dtype)
    with torch.no_grad():
        qkv.weight.copy_(torch.cat([p.weight for p in (q_proj, k_proj, v_proj)]))
        qkv.bias.copy_(torch.cat([p.bias for p in (q_proj, k_proj, v_proj)]))
    return PackedLinear(qkv.requires_grad_(False))


def padding_lengths(mask: torch.Tensor | None, frames: int) -> list[int] | None:
    """Each input's number of real frames when `mask` ((B, 1, T or 1, T), bool or additive) lets
    every query of input b attend to exactly its first n_b keys; else None (also for no mask)."""
    if mask is None or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != frames:
        return None
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]  # (B, T or 1, T)
    if not bool((allowed == allowed[:, :1]).all()):  # every query of an input sees the same keys
        return None
    return prefix_lengths(allowed[:, 0])


def prefix_lengths(real: torch.Tensor) -> list[int] | None:
    """Each row's number of true values of a (B, T) bool tensor when they are the row's first ones
    (padding only at the end); else None."""
    lengths = real.sum(1)
    prefix = torch.arange(real.shape[1], device=real.device) < lengths[:, None]
    return lengths.tolist() if bool((real == prefix).all()) else None


PACKED_ATTENTION = f"packed qkv, keys padded to a multiple of {KEY_MULTIPLE}"  # attention in the spec
# transformers' attention classes that PackedSelfAttention reproduces (the same code in each)
SELF_ATTENTION_CLASSES = ("Wav2Vec2Attention", "HubertAttention", "Data2VecAudioAttention")


def pack_self_attention(model: torch.nn.Module) -> int:
    """Replace each wav2vec2-style self-attention whose projections are PackedLinears by a
    PackedSelfAttention. Returns how many."""
    def matches(m):
        return (type(m).__name__ in SELF_ATTENTION_CLASSES and not getattr(m, "is_decoder", False)
                and all(isinstance(getattr(m, p), PackedLinear) for p in ("q_proj", "k_proj", "v_proj")))
    return replace_modules(model, matches, PackedSelfAttention)


class Float32Conv1d(torch.nn.Module):
    """A frozen grouped Conv1d run in float32 outside autocast, on a GPU. The positional conv of
    wav2vec2-style models (768 channels, kernel 128, 16 groups) took 12.7 ms in bf16 under cuDNN
    on an H200 for three 8 s clips, and 1.5 ms in float32 (bench/README.md, "GPU profile")."""

    def __init__(self, conv: torch.nn.Conv1d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias  # float32: before precast_for_autocast
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.conv1d(x.float(), self.weight, self.bias, self.stride, self.padding,
                                              self.dilation, self.groups)


class ChannelsLastConv1d(torch.nn.Module):
    """A frozen grouped Conv1d for bf16 inference on a CPU (the positional conv of wav2vec2-style
    models: 768 channels, kernel 128, 16 groups), run by oneDNN as a channels-last 2-D conv, with
    the output padded to a multiple of OUTPUT_MULTIPLE frames and cut back. The same sums: outputs
    are bit-identical (tested).

    Why: its input is the (B, T, C) activations seen as (B, C, T), which channels-last takes as they
    are; and oneDNN's time per output frame varied 4x with the output length (8 inputs, 2 cores: 5 us
    per frame at multiples of 64, 6-22 us at others; 72 ms at 383 frames, 16 ms at 384). The zeros
    appended to the input are what the conv's own padding reads there, so the first outputs do not
    change."""

    OUTPUT_MULTIPLE = 64

    def __init__(self, conv: torch.nn.Conv1d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias  # in the autocast dtype (after precast_for_autocast)
        (self.kernel,), (self.stride,), (self.padding,), (self.dilation,) = (
            conv.kernel_size, conv.stride, conv.padding, conv.dilation)
        self.groups = conv.groups
        self.weight_2d = conv.weight.detach()[:, :, None, :].contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, frames = x.shape
        out = (frames + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1
        extra = (-out % self.OUTPUT_MULTIPLE) * self.stride
        time_major = x.new_empty(batch, frames + extra, channels, dtype=self.weight_2d.dtype)
        time_major[:, :frames] = x.transpose(1, 2)
        time_major[:, frames:] = 0
        y = torch.nn.functional.conv2d(time_major.transpose(1, 2).unsqueeze(2), self.weight_2d, self.bias,
                                       (1, self.stride), (0, self.padding), (1, self.dilation), self.groups)
        return y.squeeze(2)[:, :, :out]


def channels_last_grouped_convs(model: torch.nn.Module) -> int:
    """Replace each grouped Conv1d (zero padding) by a ChannelsLastConv1d. Returns how many."""
    return replace_modules(model, is_grouped_conv, ChannelsLastConv1d)


def is_grouped_conv(m: torch.nn.Module) -> bool:
    return type(m) is torch.nn.Conv1d and m.groups > 1 and m.padding_mode == "zeros"


def float32_grouped_convs(model: torch.nn.Module) -> int:
    """Replace each grouped Conv1d (zero padding) by a Float32Conv1d. Returns how many."""
    return replace_modules(model, is_grouped_conv, Float32Conv1d)


def prepare_frozen(model: torch.nn.Module, autocast_dtype, device: str) -> tuple[str, int]:
    """Make a frozen model cheaper to run, in place: weight norm computed once, weights stored in
    the autocast dtype; on a CPU in bf16, grouped convs run channels-last and Linear weights packed
    for oneDNN; on a GPU, grouped convs kept in float32. Only the packing and the float32 convs
    change the outputs (by bf16 rounding). Returns which kernel the Linear layers run and how many
    convs run in float32, for the spec."""
    freeze_weight_norm(model)
    if autocast_dtype is None:
        return "aten", 0
    float32_convs = float32_grouped_convs(model) if device.startswith("cuda") else 0
    precast_for_autocast(model, autocast_dtype)
    if device == "cpu" and autocast_dtype == torch.bfloat16:
        channels_last_grouped_convs(model)  # bit-identical: not in the spec
    if device == "cpu" and autocast_dtype == torch.bfloat16 and onednn_packing_works():
        pack_linears(model)
        return (PACKED_FUSED_GELU if fuse_gelu(model) else PACKED), float32_convs
    return "aten", float32_convs


def precision(autocast_dtype, device: str):
    """The numeric context of a frozen forward: exact float32, or autocast to a lower precision."""
    if autocast_dtype is None:
        return exact_float32(device)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype))
    if device.startswith("cuda"):
        # With bf16/fp16 inputs PyTorch picks cuDNN's attention, which builds a new plan for every
        # new sequence length; clips of varying length made it 20x slower on an H200
        # (bench/results/gpu_sdpa_check.txt). Flash / memory-efficient attention have no such cost.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
    return stack


def _split_by_budget(items: list[int], lengths: list[int], budget: int, real: list[int] | None = None,
                     max_padding: float = 1.0) -> list[list[int]]:
    """`items` in order, in runs whose padded size (longest x count) stays within budget (an item
    larger than the budget on its own forms a run of one) and, given the items' real lengths,
    whose padded share stays within max_padding (one item alone may pad more: its rounding)."""
    parts, part, longest, total = [], [], 0, 0
    for item, n, r in zip(items, lengths, real or lengths):
        padded = max(longest, n) * (len(part) + 1)
        if part and (padded > budget or total + r < (1 - max_padding) * padded):
            parts.append(part)
            part, longest, total = [], 0, 0
        part.append(item)
        longest, total = max(longest, n), total + r
    return parts + [part] if part else parts


@register("hf")
class HFEncoder(Encoder):
    modality = ""  # audio or text: set per instance from the option or the model's config

    def __init__(
        self,
        path: str | None = None,
        modality: str | None = None,
        layer: int | str = -1,
        dtype: str = "float32",
        device: str = "auto",
        chunk_seconds: float = 30.0,
        overlap_seconds: float = 1.0,
        max_tokens: int | None = None,  # text window; None = the model's limit, at most 512
        overlap: int = 64,
    ):
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bars report progress; its weight-loading bar is noise
        self.path = str(path) if path is not None else None
        folder = check_model_folder(path)
        self.folder = folder
        self.config = AutoConfig.from_pretrained(folder, local_files_only=True)
        # A wav2vec2-style model has a strided conv feature encoder; anything else is read as text.
        is_audio = hasattr(self.config, "conv_kernel") and hasattr(self.config, "conv_stride")
        self.modality = modality or ("audio" if is_audio else "text")
        if self.modality not in ("audio", "text"):
            raise UserError(f"hf encoder: modality must be 'audio' or 'text', got {self.modality!r}")
        if self.modality == "text" and is_audio:
            raise UserError(f"hf encoder: {folder} holds an audio model ({self.config.model_type}), not a text encoder")
        if self.modality == "audio" and not is_audio:
            raise UserError(
                f"hf encoder: {folder} holds a {self.config.model_type!r} model; audio needs a wav2vec2-style "
                "model (wav2vec2, HuBERT, WavLM, data2vec-audio)"
            )
        if dtype not in DTYPES:
            raise UserError(f"hf encoder: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        n_layers = self.config.num_hidden_layers
        if not (layer == "all" or (isinstance(layer, int) and -(n_layers + 1) <= layer <= n_layers)):
            raise UserError(f"hf encoder: layer must be 'all' or an int in [-{n_layers + 1}, {n_layers}], got {layer!r}")
        self.layer = layer
        self.layers_out = n_layers + 1 if layer == "all" else 1  # embeddings + every block
        self.dim = self.config.hidden_size
        self.device = pick_device(device)
        self._weights_sha = None  # computed on first full_spec(): hashing a 1 GB file takes seconds

        try:
            # float32 whatever the checkpoint's dtype (transformers 5 would otherwise keep it)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True).float()
        except (OSError, ValueError) as e:
            raise UserError(f"hf encoder: cannot load the model in {folder}: {e}") from None
        self.model.eval().to(self.device)
        self.model.requires_grad_(False)
        # which matmul kernel the Linear layers run: part of a bf16 spec
        self.linear_kernel, self.float32_convs = prepare_frozen(self.model, DTYPES[dtype], self.device)
        packed = self.linear_kernel in (PACKED, PACKED_FUSED_GELU)
        self.attention = PACKED_ATTENTION if packed and pack_self_attention(self.model) else None  # in the spec

        if self.modality == "text":
            self._init_text(folder, max_tokens, overlap)
        else:
            self._init_audio(folder, chunk_seconds, overlap_seconds)
        # Token ids are tiny: sort many utterances together. Padded share of MiniLM's batches on
        # MELD's 13,000 transcripts: 65% with windows of 64, 8.7% with 2048, 3.2% with 8192 (if
        # padded to each batch's longest; forwards now hold one exact length, and a large window
        # fills them with more texts of that length).
        # Waveforms are ~0.3 MB per 5 s clip: 256 of them.
        self.window_utterances = 8192 if self.modality == "text" else 256

    # -- setup -----------------------------------------------------------------------------------

    def _init_text(self, folder, max_tokens, overlap):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"hf encoder: no usable tokenizer in {folder}: {e}") from None
        # The special tokens around one sequence ([CLS] x [SEP], <s> x </s>), read off a probe so
        # that any prefix/suffix template works: every window gets them.
        content = self.tokenizer("hello", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("hello", add_special_tokens=True)["input_ids"]
        at = next(i for i in range(len(full)) if full[i : i + len(content)] == content)
        self.prefix, self.suffix = full[:at], full[at + len(content) :]
        self.n_special = len(self.prefix) + len(self.suffix)
        limits = [getattr(self.config, "max_position_embeddings", None) or 512]
        if self.tokenizer.model_max_length < 100_000:  # "unset" is a huge sentinel
            limits.append(self.tokenizer.model_max_length)
        if max_tokens is None:
            max_tokens = min([512] + limits)
        if max_tokens > min(limits):
            raise UserError(f"hf encoder: max_tokens={max_tokens} exceeds the model's limit of {min(limits)} tokens")
        if not 0 <= overlap < max_tokens - self.n_special:
            raise UserError(f"hf encoder: overlap={overlap} must be >= 0 and < max_tokens minus special tokens")
        self.max_tokens, self.overlap = max_tokens, overlap
        self.fps = None
        self.masked = True  # text encoders always take an attention mask

    def _init_audio(self, folder, chunk_seconds, overlap_seconds):
        from transformers import AutoFeatureExtractor

        try:
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"hf encoder: no usable preprocessor_config.json in {folder}: {e}") from None
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.kernels, self.strides = list(self.config.conv_kernel), list(self.config.conv_stride)
        self.hop = int(np.prod(self.strides))  # samples per output frame
        self.fps = self.sample_rate / self.hop
        # Windows start on frame boundaries so that their frames line up with the whole input's.
        self.window = max(1, round(chunk_seconds * self.sample_rate / self.hop)) * self.hop
        self.window_overlap = round(overlap_seconds * self.sample_rate / self.hop) * self.hop
        if not 0 <= self.window_overlap < self.window:
            raise UserError(f"hf encoder: need 0 <= overlap_seconds < chunk_seconds, got {overlap_seconds}, {chunk_seconds}")
        self.chunk_seconds, self.overlap_seconds = chunk_seconds, overlap_seconds
        # After precast_for_autocast: the matmul copies of the conv weights keep their dtype.
        # Part of the spec: features agree with transformers' convs within float rounding, not
        # bit for bit, so stores written one way are not resumed the other.
        swapped = use_channels_last_feature_encoder(self.model, tile_frames_for(self.device))
        self.feature_encoder = self.model.feature_extractor.name if swapped else "transformers"
        # A GroupNorm feature encoder takes padded batches only in our version, which normalises
        # each input over its own samples (valid_samples in _forward_padded).
        self.masked = swapped or getattr(self.config, "feat_extract_norm", "layer") == "layer"

    # -- the top layers, for training them from the cache (model.unfreeze_top) --------------------

    # emofuse.fuse.model.EncoderLayer's names -> those of the transformers layers it reproduces: post-LN
    # layers with GELU, BertLayer / RobertaLayer for text, Wav2Vec2EncoderLayer (HuBERT and
    # data2vec-audio share it) for audio
    LAYER_NAMES = {
        "text": {
            "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
            "out": "attention.output.dense", "norm1": "attention.output.LayerNorm",
            "up": "intermediate.dense", "down": "output.dense", "norm2": "output.LayerNorm",
        },
        "audio": {
            "query": "attention.q_proj", "key": "attention.k_proj", "value": "attention.v_proj",
            "out": "attention.out_proj", "norm1": "layer_norm",
            "up": "feed_forward.intermediate_dense", "down": "feed_forward.output_dense", "norm2": "final_layer_norm",
        },
    }

    def top_layers(self, n: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """The shape (EncoderLayer's arguments) and the float32 weights of this encoder's top n
        layers, keyed '<i>.<name>.<weight|bias>' for i = 0..n-1 from the lower one up."""
        c, names = self.config, self.LAYER_NAMES[self.modality]
        encoder = getattr(self.model, "encoder", None)
        layers = getattr(encoder, "layer" if self.modality == "text" else "layers", None)
        trainable = (
            layers is not None and getattr(c, "hidden_act", None) == "gelu"
            and all(f"{path}.weight" in layers[0].state_dict() for path in names.values())
            # pre-LN stacks (wav2vec2-large-lv60, HuBERT-large) compute another layer; WavLM adds a
            # relative position bias to its attention
            and not getattr(c, "do_stable_layer_norm", False) and c.model_type != "wavlm"
        )
        if not trainable:
            raise UserError(
                f"unfreeze_top: {self.folder} ({c.model_type}) has no layers emofuse can train: it trains "
                "post-LN GELU layers (text: BERT, RoBERTa, MiniLM; audio: wav2vec2-base, HuBERT-base, "
                "data2vec-audio-base), not pre-LN (stable layer norm) models or WavLM"
            )
        if not 0 < n <= len(layers):
            raise UserError(f"unfreeze_top: the encoder has {len(layers)} layers; cannot unfreeze {n}")
        if self.modality == "text":
            dropout, attn_dropout = c.hidden_dropout_prob, c.attention_probs_dropout_prob
        else:
            dropout, attn_dropout = c.hidden_dropout, c.attention_dropout
        shape = dict(width=c.hidden_size, heads=c.num_attention_heads, ffn=c.intermediate_size, eps=c.layer_norm_eps,
                     dropout=dropout, attn_dropout=attn_dropout)
        state = {}
        for i, layer in enumerate(layers[len(layers) - n :]):
            theirs = layer.state_dict()
            for ours, path in names.items():
                for kind in ("weight", "bias"):
                    state[f"{i}.{ours}.{kind}"] = theirs[f"{path}.{kind}"].detach().float().clone()
        return shape, state

    # -- the Encoder interface -------------------------------------------------------------------

    def weights_sha256(self) -> dict:
        if self._weights_sha is None:
            self._weights_sha = {f.name: file_sha256(f) for f in weight_files(self.folder)}
        return self._weights_sha

    def full_spec(self) -> dict:
        spec = {
            "backend": self.backend,
            "path": self.path,
            "checkpoint_sha256": self.weights_sha256(),
            "model_type": self.config.model_type,
            "modality": self.modality,
            "layer": self.layer,
            "dtype": self.dtype,
        }
        if self.dtype != "float32":  # float32 stores keep the spec they always had
            spec.update(self._kernel_spec())
        if self.modality == "text":
            spec.update(max_tokens=self.max_tokens, overlap=self.overlap, padding=TEXT_PADDING)
        else:
            spec.update(sample_rate=self.sample_rate, chunk_seconds=self.chunk_seconds, overlap_seconds=self.overlap_seconds,
                        feature_encoder=self.feature_encoder)
            if self.masked:
                spec["padding"] = AUDIO_PADDING
        return spec

    def _kernel_spec(self) -> dict:
        """What a reduced-precision spec records of the kernels prepare_frozen and the attention
        swaps chose (they change the outputs' last bits)."""
        spec = {"linear_kernel": self.linear_kernel}
        if self.float32_convs:
            spec["grouped_convs"] = "float32"
        if self.attention:
            spec["attention"] = self.attention
        return spec

    def prepare(self, utt: Utterance) -> np.ndarray:
        """Text: token ids without special tokens (int64). Audio: the model's input values (float32)."""
        if self.modality == "text":
            text = (utt.text or "").strip()
            if not text:
                raise PrepareError("text", "empty transcript")
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if not ids:
                raise PrepareError("text", f"transcript gives no tokens: {text[:50]!r}")
            return np.asarray(ids, dtype=np.int64)

        path = utt.audio or utt.video
        if not path:
            raise PrepareError("decode", "utterance has no audio or video file")
        wav = load_audio(path, self.sample_rate, utt.start, utt.end)
        if conv_output_length(len(wav), self.kernels, self.strides) < 1:
            raise PrepareError("audio", f"too short: {len(wav)} samples give no frame")
        # Normalised over the whole utterance, before any chunking, so windows share one scale.
        x = self.feature_extractor(wav, sampling_rate=self.sample_rate, return_tensors="np")["input_values"][0]
        return np.asarray(x, dtype=np.float32)

    def size(self, item: np.ndarray) -> int:
        return len(item) + (self.n_special if self.modality == "text" else 0)

    def encode(self, items: list[np.ndarray]) -> list[np.ndarray]:
        # Cut every item into windows, run all windows of the batch together, stitch per item.
        windows, spans_of = [], []
        for item in items:
            spans = self._spans(len(item))
            spans_of.append(spans)
            windows += [self._window_input(item[s:e]) for s, e in spans]
        # A batch stays one forward at any pipeline budget (a GPU wants large ones); only inputs
        # cut into many windows make it larger, and that surplus is split off (FORWARD_BUDGET).
        longest = self._padded_length(max(len(w) for w in windows))
        outputs = self._forward(windows, max(FORWARD_BUDGET[self.modality], len(items) * longest))

        results, k = [], 0
        for item, spans in zip(items, spans_of):
            outs = outputs[k : k + len(spans)]
            k += len(spans)
            results.append(self._stitch(item, spans, outs))
        return results

    # -- windows ---------------------------------------------------------------------------------

    def _spans(self, n: int) -> list[tuple[int, int]]:
        if self.modality == "text":
            return chunk_spans(n, self.max_tokens - self.n_special, self.overlap)
        return chunk_spans(n, self.window, self.window_overlap, align=self.hop)

    def _window_input(self, piece: np.ndarray) -> np.ndarray:
        if self.modality == "text":
            return np.asarray(self.prefix + piece.tolist() + self.suffix, dtype=np.int64)
        return piece

    def _stitch(self, item, spans, outs) -> np.ndarray:
        if self.modality == "audio":
            # Window [s, e) of samples gives frames [s / hop, s / hop + len(out)) of the whole input.
            total = conv_output_length(len(item), self.kernels, self.strides)
            return stitch(outs, [s // self.hop for s, _ in spans], total)
        # Text: stitch the content tokens; the leading special tokens ([CLS], <s>) come from the
        # first window and the trailing ones ([SEP], </s>) from the last.
        n_front, n_back = len(self.prefix), len(self.suffix)
        content = stitch([o[n_front : len(o) - n_back] for o in outs], [s for s, _ in spans], len(item))
        return np.concatenate([outs[0][:n_front], content, outs[-1][len(outs[-1]) - n_back :]])

    # -- the forward -----------------------------------------------------------------------------

    def _forward(self, inputs: list[np.ndarray], budget: int | None = None) -> list[np.ndarray]:
        """Each input's unpadded (T, D) or (T, L, D) output, in order.

        Inputs sorted by length are cut into forwards of at most `budget` padded positions
        (default FORWARD_BUDGET), each at most MAX_PADDING padding. Masked audio is padded to the
        longest of its forward, rounded up (_padded_length); text, and audio models without a
        mask, share a forward only between inputs of exactly one length. The mask makes padding irrelevant to an input's features
        up to float rounding (within 1e-5 of encoding it alone); which inputs share a forward,
        and so the last bits, depends on the batch alone, which the pipeline's fixed batch plan
        makes reproducible (PAD_MULTIPLE).
        """
        budget = budget or FORWARD_BUDGET[self.modality]
        groups = defaultdict(list)
        for i, x in enumerate(inputs):
            groups[0 if self._pads_to_longest() else len(x)].append(i)
        outputs = [None] * len(inputs)
        for _, group in sorted(groups.items()):
            group.sort(key=lambda i: len(inputs[i]))
            lengths = [len(inputs[i]) for i in group]
            padded = [self._padded_length(n) for n in lengths]
            for part in _split_by_budget(group, padded, budget, lengths, MAX_PADDING):
                n = self._padded_length(len(inputs[part[-1]]))
                for i, out in zip(part, self._forward_padded([inputs[i] for i in part], n)):
                    outputs[i] = out
        return outputs

    def _pads_to_longest(self) -> bool:
        return self.modality == "audio" and self.masked

    def _padded_length(self, n: int) -> int:
        """An input of n positions padded to the next multiple of PAD_MULTIPLE (text: within its
        window, i.e. n itself); models without an attention mask are never padded."""
        if not self.masked:
            return n
        m = PAD_MULTIPLE[self.modality]
        padded = -(-n // m) * m
        return max(n, min(padded, self.max_tokens)) if self.modality == "text" else padded

    def _forward_padded(self, inputs: list[np.ndarray], n: int | None = None) -> list[np.ndarray]:
        lengths = [len(x) for x in inputs]
        n = max(lengths) if n is None else n
        pad = (self.tokenizer.pad_token_id or 0) if self.modality == "text" else 0.0
        batch = np.full((len(inputs), n), pad, dtype=inputs[0].dtype)
        mask = np.zeros((len(inputs), n), dtype=np.int64)
        for i, x in enumerate(inputs):
            batch[i, : len(x)] = x
            mask[i, : len(x)] = 1
        key = "input_ids" if self.modality == "text" else "input_values"
        kwargs = {key: torch.from_numpy(batch).to(self.device)}
        if self.masked:
            kwargs["attention_mask"] = torch.from_numpy(mask).to(self.device)

        with torch.inference_mode(), precision(DTYPES[self.dtype], self.device), self._valid_samples(lengths):
            out = self.model(**kwargs, output_hidden_states=True)
            hidden = list(out.hidden_states)
            # Pre-LN models (wav2vec2-large-lv60, WavLM, ...) apply a final LayerNorm that
            # transformers 5 leaves out of hidden_states; "the last hidden state" includes it.
            if out.last_hidden_state.shape == hidden[-1].shape:
                hidden[-1] = out.last_hidden_state
            h = torch.stack(hidden, dim=2) if self.layer == "all" else hidden[self.layer]
            h = h.float().cpu().numpy()
        return self._unpad(h, lengths)

    def _valid_samples(self, lengths: list[int]):
        """The feature encoder's context for a padded batch of inputs of these lengths (the encoders
        that normalise each input over its own samples have one: valid_samples)."""
        fe = getattr(self.model, "feature_extractor", None)
        if self.modality == "audio" and hasattr(fe, "valid_samples"):
            return fe.valid_samples(lengths)
        return contextlib.nullcontext()

    def _unpad(self, h: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
        """Each input's own frames of a padded batch output (B, T, ...); audio frames follow the convs."""
        if self.modality == "audio":
            lengths = [conv_output_length(m, self.kernels, self.strides) for m in lengths]
        return [np.ascontiguousarray(h[i, :t]) for i, t in enumerate(lengths)]
