"""fairseq checkpoints, as the paper used them: wav2vec 1.0 (`wav2vec_large.pt`, 512-d context vectors
of the `feature_aggregator`), wav2vec 2.0 and HuBERT (any layer, or all of them), and RoBERTa from a
folder holding `model.pt`, `dict.txt` and the GPT-2 BPE files `encoder.json` and `vocab.bpe`.

Optional: `pip install emofuse[fairseq]` (fairseq-fixed; see README). fairseq is imported only when
this backend is used. It must never pull in torchaudio (whose wheel cannot load next to a CPU torch):
nothing here imports it, and fairseq's own model modules do not.

Loading. The checkpoint is read by `load_torch_checkpoint` (weights_only=True) with an allow-list of
data-only globals that fairseq files hold: argparse.Namespace (old `args`), omegaconf containers
(`cfg`), fairseq's Dictionary (HuBERT's `task_state`) and numpy scalars (training metrics). Then
fairseq's own code builds the task and the model and loads the weights strictly
(checkpoint_utils.load_model_ensemble_and_task). fairseq `eval()`s the conv layer specs of audio
models (e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4"), so those strings are checked to be plain list
arithmetic first: a checkpoint is code-free or it is refused (unless trust_checkpoint).

Layers. wav2vec 2.0, HuBERT and RoBERTa give L + 1 states: the transformer's input, then the output
of each layer, the last one being the model's final output (with the final LayerNorm of pre-LN
models), as transformers' hidden_states. `layer: N` picks one, `layer: all` keeps every one (T, L+1, D).
wav2vec 1.0 has one output, its context vectors.

Windowing and batching are HFEncoder's (long inputs cut into overlapping windows and stitched back;
see chunking.py). An utterance's features never depend on its batch-mates: RoBERTa, wav2vec 2.0,
HuBERT and wav2vec 1.0 get padded, masked batches. The convs of wav2vec 2.0 / HuBERT run through
conv_features, which normalises each input over its own samples (fairseq's group norm would
average over the padding), and HuBERT's padding mask is drawn at its frame boundaries
(FairseqEncoder._padding_mask). wav2vec 1.0's features are computed for each input alone
(Wav2vec1Features), and its aggregator, whose convs are causal, gets norms that take each input's
statistics from its own frames (MaskedGroupNorm). Checkpoints of other layouts keep fairseq's
modules and share a forward only between inputs of exactly one length.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from emofuse.corpora.base import Utterance
from emofuse.errors import PrepareError, UserError
from emofuse.extract.encoders.base import file_sha256, register
from emofuse.extract.encoders.chunking import conv_output_length
from emofuse.extract.encoders.conv_features import (
    MAX_NORM_WINDOW,
    TILE_FRAMES,
    ChannelsLastFeatureEncoder,
    channel_norm,
    flat_weight,
    strided_conv,
    supported_layer,
    tile_frames_for,
)
from emofuse.extract.encoders.fabnet import AUTOCAST, load_torch_checkpoint
from emofuse.extract.encoders.hf import (
    AUDIO_PADDING,
    PACKED,
    PACKED_ATTENTION,
    PACKED_FUSED_GELU,
    TEXT_PADDING,
    HFEncoder,
    PackedLinear,
    attend_padded_keys,
    fuse_gelu,
    packed_qkv,
    pick_device,
    precision,
    prefix_lengths,
    prepare_frozen,
    replace_modules,
)
from emofuse.extract.media import load_audio

INSTALL_HINT = "pip install emofuse[fairseq] (see README)"
TEXT_FILES = ("model.pt", "dict.txt", "encoder.json", "vocab.bpe")


def import_fairseq():
    """fairseq's model, task and checkpoint modules; a UserError when fairseq is not installed."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logging.getLogger("fairseq").setLevel(logging.WARNING)  # its INFO notices (model configs, tensorboardX)
    try:
        import fairseq.checkpoint_utils
        import fairseq.models
        import fairseq.tasks  # noqa: F401
    except ImportError as e:
        raise UserError(f"fairseq encoder: fairseq is not installed ({e}): {INSTALL_HINT}") from None
    finally:
        # Two of fairseq's task modules call logging.basicConfig(level=INFO) on import: keep the
        # host program's logging as it was.
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    return fairseq


def safe_globals() -> list:
    """What fairseq checkpoints pickle besides tensors and plain containers: all data, no code."""
    import collections
    import typing

    from fairseq.data.dictionary import Dictionary
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode

    mult = (np._core if hasattr(np, "_core") else np.core).multiarray
    numpy_globals = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # files from numpy 1.x and 2.x
        numpy_globals += [(mult.scalar, f"{module}.scalar"), (mult._reconstruct, f"{module}._reconstruct")]
    numpy_globals += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i4", "i8", "u1", "bool")]
    return [argparse.Namespace, Dictionary, DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode,
            BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode, typing.Any,
            collections.defaultdict, dict, list, int, float, str, bool] + numpy_globals


class LayerSpecCheck(ast.NodeVisitor):
    """Accepts only lists/tuples of numbers combined with + and * (what fairseq's conv specs are)."""

    ALLOWED = (ast.Expression, ast.List, ast.Tuple, ast.Constant, ast.BinOp, ast.Add, ast.Mult, ast.Load,
               ast.UnaryOp, ast.USub)

    def generic_visit(self, node):
        if not isinstance(node, self.ALLOWED):
            raise ValueError(type(node).__name__)
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            raise ValueError(repr(node.value))
        super().generic_visit(node)


def check_code_free(cfg, path, trust: bool) -> None:
    """fairseq eval()s these strings of an audio model's config: make sure they hold no code."""
    model_cfg = cfg.model
    for key in ("conv_feature_layers", "conv_aggregator_layers"):
        text = model_cfg.get(key) if hasattr(model_cfg, "get") else getattr(model_cfg, key, None)
        if text is None or trust:
            continue
        try:
            LayerSpecCheck().visit(ast.parse(str(text), mode="eval"))
        except (SyntaxError, ValueError):
            raise UserError(
                f"fairseq encoder: {path}: model.{key} = {str(text)[:80]!r} is not a plain layer list, and "
                f"fairseq would eval() it; set trust_checkpoint: true only if you trust this file"
            ) from None


def read_checkpoint(path: Path, trust: bool) -> dict:
    """The checkpoint's contents, read without running code (see load_torch_checkpoint)."""
    with torch.serialization.safe_globals(safe_globals()):
        state = load_torch_checkpoint(path, "fairseq encoder", trust)
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"fairseq encoder: {path} is not a fairseq checkpoint (no 'model' entry)")
    if state.get("args") is None and state.get("cfg") is None:
        raise UserError(f"fairseq encoder: {path} has neither 'args' nor 'cfg': not a fairseq training checkpoint")
    return state


def model_name(state: dict) -> str | None:
    """The registered model or architecture name of a checkpoint (old files: args.arch)."""
    if state.get("args") is not None:
        arch = getattr(state["args"], "arch", None)
        return "wav2vec" if arch == "audio_cpc" else arch  # renamed, see checkpoint_utils._upgrade_state_dict
    model = state["cfg"].get("model") if hasattr(state["cfg"], "get") else None
    if isinstance(model, argparse.Namespace):  # models configured by argparse (RoBERTa) keep a Namespace here
        return getattr(model, "_name", None) or getattr(model, "arch", None)
    return model.get("_name") if hasattr(model, "get") else None


def build_fairseq_model(state: dict, path: Path, overrides: dict, trust: bool):
    """(model, cfg, task): fairseq's own upgrade of the config, task set-up and strict weight loading."""
    fairseq = import_fairseq()
    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import OmegaConf

    # What checkpoint_utils.load_checkpoint_to_cpu does after its own (unsafe) torch.load.
    if state.get("args") is not None:
        for name, value in overrides.items():
            setattr(state["args"], name, value)
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        overwrite_args_by_name(state["cfg"], overrides)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hydra's deprecation notices when fairseq converts old args
            state = fairseq.checkpoint_utils._upgrade_state_dict(state)
    except (KeyError, AttributeError, TypeError) as e:
        raise UserError(f"fairseq encoder: {path}: unreadable fairseq configuration ({e!r})") from None
    check_code_free(state["cfg"], path, trust)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hydra again, and torch's weight_norm deprecation
            models, cfg, task = fairseq.checkpoint_utils.load_model_ensemble_and_task(
                [str(path)], arg_overrides=overrides, state=state, strict=True)
    except RuntimeError as e:  # load_state_dict: missing / unexpected / mis-shaped keys
        reason = " ".join(str(e).split())  # one line, as every UserError
        raise UserError(f"fairseq encoder: {path}: the weights do not match the model: {reason[:400]}") from None
    except FileNotFoundError as e:
        raise UserError(f"fairseq encoder: {path}: the model needs a file that is not there: {e}") from None
    return models[0], cfg, task


def model_class(name: str | None, path):
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
    from fairseq.models.hubert import HubertModel
    from fairseq.models.roberta import RobertaModel
    from fairseq.models.wav2vec import Wav2Vec2Model, Wav2VecModel

    model_cls = ARCH_MODEL_REGISTRY.get(name) or MODEL_REGISTRY.get(name)
    if model_cls is None or not issubclass(model_cls, (Wav2VecModel, Wav2Vec2Model, HubertModel, RobertaModel)):
        raise UserError(
            f"fairseq encoder: {path} holds a {name!r} model; supported: wav2vec, wav2vec2 and hubert "
            f"(pre-trained, not fine-tuned CTC checkpoints) and roberta"
        )
    return model_cls


def is_fairseq_gelu(activation) -> bool:
    """Whether a fairseq layer's activation_fn is its exact GELU (fairseq.modules.gelu.gelu: erf, in
    float32), not gelu_accurate (tanh) or another function."""
    from fairseq.modules.gelu import gelu

    return activation is gelu


class PackedFairseqSelfAttention(torch.nn.Module):
    """fairseq's MultiheadAttention as the self-attention of a frozen bf16 model on a CPU (the
    transformer layers of wav2vec 2.0, HuBERT and RoBERTa), computed as hf.PackedSelfAttention does:
    q, k and v from one PackedLinear, the keys zero-padded to a multiple of hf.KEY_MULTIPLE frames
    and masked (hf.attend_padded_keys), the output projection packed. fairseq's own forward runs
    all four projections through F.linear on the plain bf16 weights (F.multi_head_attention_forward
    with separate projection weights), which oneDNN reorders on every call. Any other call (attention
    weights asked for, cross-attention, an attention mask, a padding mask that is not each input's
    tail, incremental state) runs fairseq's forward."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        self.fairseq = attention  # its forward for the other calls; its weights stay where they were
        self.qkv = packed_qkv(attention.q_proj, attention.k_proj, attention.v_proj)

    def forward(self, query, key=None, value=None, key_padding_mask=None, incremental_state=None, need_weights=True,
                static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False):
        frames, batch, width = query.shape  # fairseq's (T, B, C)
        plain = (key is query and value is query and attn_mask is None and incremental_state is None
                 and not (need_weights or need_head_weights or static_kv or before_softmax))
        lengths = tail_padding_lengths(key_padding_mask, batch, frames) if plain else None
        if lengths is None:
            return self.fairseq(query, key, value, key_padding_mask, incremental_state, need_weights, static_kv,
                                attn_mask, before_softmax, need_head_weights)
        heads = self.fairseq.num_heads
        qkv = self.qkv(query.transpose(0, 1)).view(batch, frames, 3, heads, width // heads)
        out = attend_padded_keys(qkv, lengths, self.fairseq.scaling)  # (B, heads, T, head_dim)
        return self.fairseq.out_proj(out.permute(2, 0, 1, 3).reshape(frames, batch, width)), None


def tail_padding_lengths(padding_mask: torch.Tensor | None, batch: int, frames: int) -> list[int] | None:
    """Each input's real frames from fairseq's key padding mask ((B, T), true at padding), when the
    padding is each input's tail; all frames for no mask; else None."""
    if padding_mask is None:
        return [frames] * batch
    return prefix_lengths(~padding_mask.bool()) if padding_mask.shape == (batch, frames) else None


def pack_fairseq_self_attention(model: torch.nn.Module) -> int:
    """Replace each plain fairseq self-attention whose projections are PackedLinears (after
    prepare_frozen) by a PackedFairseqSelfAttention. Returns how many."""
    def matches(m):
        return (type(m).__name__ == "MultiheadAttention" and getattr(m, "self_attention", False)
                and m.bias_k is None and m.bias_v is None and not m.add_zero_attn
                and not getattr(m, "skip_embed_dim_check", False)
                and all(isinstance(getattr(m, p), PackedLinear) for p in ("q_proj", "k_proj", "v_proj", "out_proj")))
    return replace_modules(model, matches, PackedFairseqSelfAttention)


class FairseqConvLayer(torch.nn.Module):
    """One block of fairseq's wav2vec 2.0 / HuBERT ConvFeatureExtractionModel under the names of
    transformers' conv layers (conv, layer_norm, activation), which ChannelsLastFeatureEncoder reads."""

    def __init__(self, conv: torch.nn.Conv1d, norm: torch.nn.Module | None, activation: torch.nn.Module):
        super().__init__()
        self.conv, self.activation = conv, activation
        if norm is not None:
            self.layer_norm = norm


def channels_last_feature_encoder(extractor: torch.nn.Module,
                                  tile_frames: int | None = TILE_FRAMES) -> ChannelsLastFeatureEncoder | None:
    """fairseq's conv feature encoder as a ChannelsLastFeatureEncoder (conv_features.py: the same
    convolutions as matmuls, channels last, in tiles), or None where a block is not one it computes.
    fairseq's blocks are Sequential(conv, dropout, [norm], GELU), the norm a Fp32GroupNorm or
    Sequential(TransposeLast, Fp32LayerNorm, TransposeLast); Fp32LayerNorm on a (T, C) tile normalises
    the same channels in float32, as it does in fairseq."""
    layers = []
    for block in getattr(extractor, "conv_layers", []):
        parts = list(block) if isinstance(block, torch.nn.Sequential) else []
        if len(parts) not in (3, 4) or not isinstance(parts[1], torch.nn.Dropout) or type(parts[-1]) is not torch.nn.GELU:
            return None
        norm = None
        if len(parts) == 4:
            norm = parts[2]
            if isinstance(norm, torch.nn.Sequential):  # LayerNorm over channels, between two transposes
                names = [type(m).__name__ for m in norm]
                if names[::2] != ["TransposeLast", "TransposeLast"] or not isinstance(norm[1], torch.nn.LayerNorm):
                    return None
                norm = norm[1]
        layers.append(FairseqConvLayer(parts[0], norm, parts[-1]))
    if not layers or not all(supported_layer(layer) for layer in layers):
        return None
    convs = torch.nn.Module()
    convs.conv_layers = torch.nn.ModuleList(layers)
    return ChannelsLastFeatureEncoder(convs, tile_frames)


class FrameLengths:
    """Each input's real frame count in the padded batch being encoded (None: every frame is real),
    shared by wav2vec 1.0's feature extractor and its aggregator's norms. A plain object, not a
    module, so that the model's module tree stays a tree."""

    lengths: list[int] | None = None


class MaskedGroupNorm(torch.nn.Module):
    """fairseq's Fp32GroupNorm(1, C) of wav2vec 1.0's aggregator, (B, C, T) -> (B, C, T), with each
    input's mean and variance taken over its own real frames (frames.lengths) of a padded batch. The
    aggregator's convs are causal (padded on the left), so the padding after an input's frames
    reaches them only through these statistics; without padding it is fairseq's own norm."""

    def __init__(self, norm: torch.nn.GroupNorm, frames: FrameLengths):
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = self.frames.lengths
        if lengths is None or min(lengths) == x.shape[2]:
            return self.norm(x)
        x32 = x.float()  # as Fp32GroupNorm
        var, mean = (torch.stack(v) for v in zip(*(torch.var_mean(x_b[:, :n], correction=0)
                                                    for x_b, n in zip(x32, lengths))))
        scale = torch.rsqrt(var + self.norm.eps)[:, None, None]  # (B, 1, 1), then (B, C, 1)
        shift = -mean[:, None, None] * scale
        if self.norm.affine:
            weight = self.norm.weight.float()[None, :, None]
            scale, shift = scale * weight, shift * weight + self.norm.bias.float()[None, :, None]
        # one pass over the activations; in place only over a copy (x.float() is x in float32)
        return torch.addcmul(shift, x32, scale, out=None if x32 is x else x32).type_as(x)


def mask_aggregator_norms(aggregator: torch.nn.Module, frames: FrameLengths) -> bool:
    """Give wav2vec 1.0's conv aggregator (fairseq's ConvAggegator: blocks Sequential(causal pad,
    conv of stride 1, dropout, GroupNorm(1, C), activation)) norms that take each input's statistics
    from its own frames, in place. Returns False, changing nothing, for any other aggregator."""
    blocks = getattr(aggregator, "conv_layers", None)
    if type(aggregator).__name__ != "ConvAggegator" or blocks is None:
        return False
    for block in blocks:
        parts = list(block) if isinstance(block, torch.nn.Sequential) else []
        if (len(parts) != 5 or not isinstance(parts[1], torch.nn.Conv1d) or parts[1].stride != (1,)
                or parts[1].padding != (0,) or not isinstance(parts[3], torch.nn.GroupNorm) or parts[3].num_groups != 1
                or getattr(parts[0], "padding", (None, 0))[1] != 0):  # left padding only: causal
            return False
    for block in blocks:
        block[3] = MaskedGroupNorm(block[3], frames)
    return True


class Wav2vec1Features(torch.nn.Module):
    """wav2vec 1.0's conv feature extractor (fairseq's wav2vec.ConvFeatureExtractionModel), channels
    last: (B, samples) -> (B, C, frames). Each conv is matmuls over strided views (strided_conv), as
    in conv_features.py. The first layer's GroupNorm(1, C) is folded into its conv (channel_norm);
    each later one takes one mean and variance of the layer's whole (T, C) output, from float32
    sums, and is applied as a per-channel multiply-add in float32, rounded once as fairseq's
    Fp32GroupNorm rounds. fairseq's own convs run channels first through oneDNN, which reordered the
    512 x 3,200-per-second activations around every layer in bf16 (bench/README.md, "fairseq backend
    in bf16"). Not tiled: a layer's norm needs all of its output first."""

    name = "channels-last-matmul, whole"  # for the spec

    def __init__(self, extractor: torch.nn.Module):
        super().__init__()
        self.fe = extractor
        self.flat_weights = [flat_weight(block[0]) for block in extractor.conv_layers]
        self.kernels = [block[0].kernel_size[0] for block in extractor.conv_layers]
        self.strides = [block[0].stride[0] for block in extractor.conv_layers]
        self.lengths = None  # see valid_samples()
        self.frames = FrameLengths()  # shared with the aggregator's norms (MaskedGroupNorm)

    @contextlib.contextmanager
    def valid_samples(self, lengths: list[int]):
        """Within this context input i of a zero-padded batch is its first lengths[i] samples: its
        frames are computed from those alone, and the aggregator's norms (MaskedGroupNorm) take
        their statistics from its real frames only. The padding's frames are zeros."""
        self.lengths = list(lengths)
        self.frames.lengths = [conv_output_length(n, self.kernels, self.strides) for n in lengths]
        try:
            yield
        finally:
            self.lengths = self.frames.lengths = None

    @classmethod
    def of(cls, extractor: torch.nn.Module) -> Wav2vec1Features | None:
        """The channels-last version of a released model's extractor: blocks Sequential(conv without
        bias, dropout, affine GroupNorm(1, C), ReLU), no skip connections; else None."""
        blocks = getattr(extractor, "conv_layers", None)
        if not blocks or getattr(extractor, "skip_connections", True):
            return None
        for block in blocks:
            parts = list(block) if isinstance(block, torch.nn.Sequential) else []
            if (len(parts) != 4 or not isinstance(parts[0], torch.nn.Conv1d) or parts[0].bias is not None
                    or parts[0].groups != 1 or parts[0].padding != (0,) or parts[0].dilation != (1,)
                    or not isinstance(parts[1], torch.nn.Dropout) or not isinstance(parts[2], torch.nn.GroupNorm)
                    or parts[2].num_groups != 1 or not parts[2].affine or type(parts[3]) is not torch.nn.ReLU):
                return None
        return cls(extractor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = self.lengths or [x.shape[1]] * len(x)
        outs = [self.one(x_b[:n]) for x_b, n in zip(x, lengths)]
        frames = conv_output_length(x.shape[1], self.kernels, self.strides)
        out = outs[0].new_zeros(len(outs), frames, outs[0].shape[1])
        for out_b, o in zip(out, outs):
            out_b[: len(o)] = o
        return out.transpose(1, 2)

    def one(self, x: torch.Tensor) -> torch.Tensor:
        h = x[:, None]  # (samples, 1)
        for i, (block, w) in enumerate(zip(self.fe.conv_layers, self.flat_weights)):
            conv, norm = block[0], block[2]
            if i == 0 and conv.kernel_size[0] * conv.in_channels <= MAX_NORM_WINDOW:
                # The first layer's norm folded into its conv from the statistics of its 10-sample
                # windows (channel_norm): no pass over its 512 x 3,200-per-second output but the one
                # that writes it.
                h = channel_norm(h, len(h), conv, w, norm)(h).relu_()
                continue
            h = strided_conv(h, conv, w)
            # As fairseq's Fp32GroupNorm: statistics of the float32 copy of the layer's output, the
            # affine map in float32, rounded once. torch sums float32 pairwise (~1e-8 relative
            # here); the variance is formed in float64. var_mean (Welford) took 1.6x as long.
            h32 = h.float()
            n = h32.numel()
            mean = h32.sum().double() / n
            var = h32.square().sum().double() / n - mean**2
            scale = torch.rsqrt(var + norm.eps).float() * norm.weight.float()
            shift = norm.bias.float() - mean.float() * scale
            h = torch.addcmul(shift, h32, scale, out=h32).to(h.dtype).relu_()
        if self.fe.log_compression:
            h = h.abs_().add_(1).log_()
        return h


@register("fairseq")
class FairseqEncoder(HFEncoder):
    """Reuses HFEncoder's windowing (encode, _spans, _window_input, _stitch, _forward); loading,
    prepare and the padded forward are fairseq's."""

    modality = ""  # audio or text, from the checkpoint

    def __init__(
        self,
        path: str | None = None,  # audio: the .pt file; text: the folder with model.pt, dict.txt, encoder.json, vocab.bpe
        modality: str | None = None,
        layer: int | str = -1,
        dtype: str = "float32",
        device: str = "auto",
        chunk_seconds: float = 30.0,
        overlap_seconds: float = 1.0,
        max_tokens: int | None = None,  # text window; None = the model's limit, at most 512
        overlap: int | None = None,  # text window overlap; None = 64, or a quarter of a short window
        trust_checkpoint: bool = False,
    ):
        if not path:
            raise UserError("fairseq encoder: option 'path' is required (a checkpoint .pt file, or a RoBERTa folder)")
        self.path = str(path)
        given = Path(path).expanduser()
        folder = given if given.is_dir() else given.parent
        checkpoint = folder / "model.pt" if given.is_dir() else given
        if not checkpoint.is_file():
            raise UserError(
                f"fairseq encoder: checkpoint {str(checkpoint)!r} not found. Nothing is downloaded at run time: "
                f"put the fairseq checkpoint there (audio: e.g. wav2vec_large.pt, wav2vec_small.pt, "
                f"hubert_base_ls960.pt; text: a folder with {', '.join(TEXT_FILES)}, e.g. roberta.large)"
            )
        if dtype not in AUTOCAST:
            raise UserError(f"fairseq encoder: dtype must be one of {sorted(AUTOCAST)}, got {dtype!r}")
        self.device = pick_device(device)
        if dtype == "float16" and not self.device.startswith("cuda"):
            raise UserError("fairseq encoder: dtype float16 needs a GPU (use bfloat16 on a CPU)")
        self.dtype = dtype
        self.checkpoint, self.folder = checkpoint, folder
        self._weights_sha = None

        import_fairseq()
        from fairseq.models.roberta import RobertaModel

        state = read_checkpoint(checkpoint, trust_checkpoint)
        model_cls = model_class(model_name(state), checkpoint)
        is_text = issubclass(model_cls, RobertaModel)
        self.modality = modality or ("text" if is_text else "audio")
        if self.modality != ("text" if is_text else "audio"):
            raise UserError(f"fairseq encoder: {checkpoint} holds a {model_cls.__name__}, which encodes "
                            f"{'text' if is_text else 'audio'}, not {self.modality}")
        overrides = {"data": str(folder)}  # RoBERTa's task reads dict.txt from its data folder
        if is_text:
            missing = [f for f in TEXT_FILES if not (folder / f).is_file()]
            if missing:
                raise UserError(f"fairseq encoder: RoBERTa folder {folder} lacks {', '.join(missing)} "
                                f"(it needs {', '.join(TEXT_FILES)}; the GPT-2 BPE files come with fairseq's "
                                f"RoBERTa release)")
        else:
            overrides["label_dir"] = str(folder)  # HuBERT: dict.<label>.txt beside the checkpoint, if not in it
        self.model, self.cfg, self.task = build_fairseq_model(state, checkpoint, overrides, trust_checkpoint)
        self.model.eval().requires_grad_(False).to(self.device)
        # As for the hf backend: in bf16 on a CPU fairseq's own forward ran slower than its float32
        # (weights recast on every call, channels-first convs; bench/README.md, "fairseq backend in bf16")
        self.linear_kernel, self.float32_convs = prepare_frozen(self.model, AUTOCAST[dtype], self.device)
        if self.linear_kernel == PACKED and fuse_gelu(self.model, [("fc1", "activation_fn")], is_fairseq_gelu):
            self.linear_kernel = PACKED_FUSED_GELU  # fairseq's transformer layers name their FFN otherwise
        packed = self.linear_kernel in (PACKED, PACKED_FUSED_GELU)
        self.attention = PACKED_ATTENTION if packed and pack_fairseq_self_attention(self.model) else None  # in the spec
        self.kind = type(self.model).__name__  # Wav2VecModel | Wav2Vec2Model | HubertModel | RobertaModel
        if is_text:
            self._init_text_model(max_tokens, overlap)
        else:
            self._init_audio_model(chunk_seconds, overlap_seconds)

        n = self.n_layers
        if self.kind == "Wav2VecModel":
            if layer not in (-1, 0):
                raise UserError(f"fairseq encoder: wav2vec 1.0 has one output (its context vectors); "
                                f"layer must be -1, got {layer!r}")
            layer = -1
        elif not (layer == "all" or (isinstance(layer, int) and -(n + 1) <= layer <= n)):
            raise UserError(f"fairseq encoder: layer must be 'all' or an int in [-{n + 1}, {n}], got {layer!r}")
        self.layer = layer
        self.layers_out = n + 1 if layer == "all" else 1

    # -- setup -----------------------------------------------------------------------------------

    def _init_text_model(self, max_tokens, overlap):
        from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

        self.bpe = get_encoder(str(self.folder / "encoder.json"), str(self.folder / "vocab.bpe"))
        self.dictionary = self.task.source_dictionary
        self.prefix, self.suffix = [self.dictionary.bos()], [self.dictionary.eos()]  # <s> x </s>
        self.n_special = 2
        encoder = self.model.encoder.sentence_encoder
        self.n_layers = len(encoder.layers)
        self.dim = encoder.embed_tokens.embedding_dim
        limit = self.model.max_positions()
        if max_tokens is None:
            max_tokens = min(512, limit)
        if max_tokens > limit:
            raise UserError(f"fairseq encoder: max_tokens={max_tokens} exceeds the model's limit of {limit} tokens")
        if overlap is None:
            overlap = min(64, (max_tokens - self.n_special) // 4)
        if not 0 <= overlap < max_tokens - self.n_special:
            raise UserError(f"fairseq encoder: overlap={overlap} must be >= 0 and < max_tokens minus special tokens")
        self.max_tokens, self.overlap = max_tokens, overlap
        self.fps = None
        self.masked = True  # padding_idx tokens are masked out of attention, positions skip them

    def _init_audio_model(self, chunk_seconds, overlap_seconds):
        task_cfg = self.cfg.task
        self.sample_rate = int(task_cfg.get("sample_rate", 16000))
        self.normalize = bool(task_cfg.get("normalize", False))
        convs = [m for m in self.model.feature_extractor.modules() if isinstance(m, torch.nn.Conv1d)]
        self.kernels = [c.kernel_size[0] for c in convs]
        self.strides = [c.stride[0] for c in convs]
        self.hop = int(np.prod(self.strides))
        self.fps = self.sample_rate / self.hop
        if self.kind == "Wav2VecModel":
            if self.model.vector_quantizer is not None:
                raise UserError("fairseq encoder: vq-wav2vec checkpoints are not supported (use wav2vec or wav2vec 2.0)")
            self.n_layers = 0
            self.dim = self._probe_dim()
        else:
            if getattr(self.model, "crop_seq_to_multiple", 1) != 1:
                raise UserError("fairseq encoder: models with crop_seq_to_multiple > 1 are not supported")
            self.n_layers = len(self.model.encoder.layers)
            self.dim = self.model.encoder.embedding_dim
        self.feature_encoder = "fairseq"
        fe = self.model.feature_extractor
        if self.kind == "Wav2VecModel":
            channels_last = Wav2vec1Features.of(fe)
        else:
            # In every dtype: ours takes each input's GroupNorm statistics from its own samples
            # (valid_samples in _forward_padded), where fairseq's group norm averages over the
            # padding; in float32 it equals fairseq's convs within float rounding.
            channels_last = channels_last_feature_encoder(fe, tile_frames_for(self.device))
        if channels_last is not None:
            self.model.feature_extractor = channels_last
            self.feature_encoder = channels_last.name
        if self.kind != "Wav2VecModel" and AUTOCAST[self.dtype] is not None:
            # fairseq hands its first layer a (T, B, C) transpose of a (B, T, C) tensor. Under
            # autocast a Linear on that layout cannot fold it into one matrix without a copy, so
            # torch.matmul runs a batched matmul over T with the weight copied T times: three
            # copies of 470 MB in the forward of three 8 s clips at wav2vec2-base size, half the
            # time of that bf16 forward. A contiguous copy of the input (2 MB) instead. (float32
            # showed no such cost.)
            first = self.model.encoder.layers[0]
            first.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
        # Padded, masked batches where padding cannot reach an input's frames: wav2vec 2.0 / HuBERT
        # with our convs, or with fairseq's where they normalise each frame alone (layer norm), and
        # HuBERT's frame mask built to match the conv arithmetic (_padding_mask); wav2vec 1.0 with
        # ours, each input's frames computed alone, and its aggregator's norms masked (its convs
        # are causal). Otherwise only inputs of exactly one length share a forward.
        if self.kind == "Wav2VecModel":
            self.masked = isinstance(channels_last, Wav2vec1Features) and mask_aggregator_norms(
                self.model.feature_aggregator, channels_last.frames)
        else:
            self.masked = isinstance(channels_last, ChannelsLastFeatureEncoder) or (
                self.cfg.model.get("extractor_mode") == "layer_norm")
        self.window = max(1, round(chunk_seconds * self.sample_rate / self.hop)) * self.hop
        self.window_overlap = round(overlap_seconds * self.sample_rate / self.hop) * self.hop
        if not 0 <= self.window_overlap < self.window:
            raise UserError(f"fairseq encoder: need 0 <= overlap_seconds < chunk_seconds, "
                            f"got {overlap_seconds}, {chunk_seconds}")
        self.chunk_seconds, self.overlap_seconds = chunk_seconds, overlap_seconds

    def _probe_dim(self) -> int:
        with torch.inference_mode(), precision(AUTOCAST[self.dtype], self.device):  # weights may be cast already
            x = torch.zeros(1, max(self.kernels) * self.hop, device=self.device)
            return int(self.model.feature_aggregator(self.model.feature_extractor(x)).shape[1])

    # -- the Encoder interface -------------------------------------------------------------------

    def weights_sha256(self) -> dict:
        if self._weights_sha is None:
            files = [self.folder / f for f in TEXT_FILES] if self.modality == "text" else [self.checkpoint]
            self._weights_sha = {f.name: file_sha256(f) for f in files}
        return self._weights_sha

    def full_spec(self) -> dict:
        spec = {
            "backend": self.backend,
            "path": self.path,
            "checkpoint_sha256": self.weights_sha256(),
            "model_type": self.kind,
            "modality": self.modality,
            "layer": self.layer,
            "dtype": self.dtype,
        }
        if self.modality == "text":  # HFEncoder._forward's padding applies here too
            spec.update(max_tokens=self.max_tokens, overlap=self.overlap, padding=TEXT_PADDING)
        else:
            spec.update(sample_rate=self.sample_rate, normalize=self.normalize,
                        chunk_seconds=self.chunk_seconds, overlap_seconds=self.overlap_seconds)
            if self.masked:  # HFEncoder._forward pads to the longest of each forward
                spec["padding"] = AUDIO_PADDING
        if self.modality == "audio" and (self.dtype != "float32" or self.feature_encoder != "fairseq"):
            spec["feature_encoder"] = self.feature_encoder
        if self.dtype != "float32":
            spec.update(self._kernel_spec())
        return spec

    def prepare(self, utt: Utterance) -> np.ndarray:
        """Text: dictionary ids of the GPT-2 BPE tokens, without <s> </s> (int64). Audio: the waveform
        the model takes (float32; normalised over the whole utterance when the model was trained so)."""
        if self.modality == "text":
            text = (utt.text or "").strip()
            if not text:
                raise PrepareError("text", "empty transcript")
            bpe = " ".join(map(str, self.bpe.encode(text)))  # what fairseq's GPT2BPE.encode gives
            ids = self.dictionary.encode_line(bpe, append_eos=False, add_if_not_exist=False)
            if len(ids) == 0:
                raise PrepareError("text", f"transcript gives no tokens: {text[:50]!r}")
            return ids.numpy().astype(np.int64)

        path = utt.audio or utt.video
        if not path:
            raise PrepareError("decode", "utterance has no audio or video file")
        wav = load_audio(path, self.sample_rate, utt.start, utt.end)
        if conv_output_length(len(wav), self.kernels, self.strides) < 1:
            raise PrepareError("audio", f"too short: {len(wav)} samples give no frame")
        if self.normalize:  # as fairseq's RawAudioDataset.postprocess, before any chunking
            with torch.no_grad():
                x = torch.from_numpy(wav)
                wav = torch.nn.functional.layer_norm(x, x.shape).numpy()
        return np.ascontiguousarray(wav, dtype=np.float32)

    # -- the forward -----------------------------------------------------------------------------

    def _forward_padded(self, inputs: list[np.ndarray], n: int | None = None) -> list[np.ndarray]:
        lengths = [len(x) for x in inputs]
        n = max(lengths) if n is None else n  # the padded length HFEncoder._forward chose
        pad = self.dictionary.pad() if self.modality == "text" else 0.0
        batch = np.full((len(inputs), n), pad, dtype=inputs[0].dtype)
        for i, x in enumerate(inputs):
            batch[i, : len(x)] = x
        batch = torch.from_numpy(batch).to(self.device)

        with torch.inference_mode(), precision(AUTOCAST[self.dtype], self.device):
            if self.kind == "Wav2VecModel":  # as fairseq's examples/wav2vec/wav2vec_featurize.py
                with self._valid_samples(lengths):
                    h = self.model.feature_aggregator(self.model.feature_extractor(batch)).transpose(1, 2)
            else:
                with self._valid_samples(lengths):
                    states = self._states(batch, lengths, n)
                h = torch.stack(states, dim=2) if self.layer == "all" else states[self.layer]
            h = h.float().cpu().numpy()
        return self._unpad(h, lengths)

    def _states(self, batch, lengths, n) -> list[torch.Tensor]:
        """The L + 1 hidden states (B, T, D): the transformer's input, each layer's output, the last
        one being the model's own final output."""
        if self.kind == "RobertaModel":
            features, extra = self.model(batch, features_only=True, return_all_hiddens=True)
            states = [s.transpose(0, 1) for s in extra["inner_states"]]
            return states[:-1] + [features]

        # wav2vec 2.0 / HuBERT do not return the transformer's input: read it, and each layer's
        # output, off the layers with hooks while fairseq's own forward runs.
        seen = []
        layers = self.model.encoder.layers
        hooks = [layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))]
        hooks += [lay.register_forward_hook(lambda module, args, out: seen.append(out[0])) for lay in layers]
        padding_mask = self._padding_mask(lengths, n).to(batch.device) if min(lengths) < n else None
        try:
            if self.kind == "HubertModel":
                final, _ = self.model.extract_features(batch, padding_mask=padding_mask, mask=False)
            else:
                final = self.model.extract_features(batch, padding_mask, mask=False)["x"]
        finally:
            for h in hooks:
                h.remove()
        t = final.shape[1]  # the encoder pads T to a multiple of required_seq_len_multiple inside
        return [s.transpose(0, 1)[:, :t] for s in seen[:-1]] + [final]

    def _padding_mask(self, lengths: list[int], n: int) -> torch.Tensor:
        """The mask over samples (True on padding) that fairseq's forward takes for inputs of these
        lengths padded to n samples, drawn so that each input keeps exactly the frames it has alone.

        wav2vec 2.0 turns it into frames with the conv arithmetic, so it marks each input's padding.
        HuBERT cuts the samples into as many equal runs as there are frames and masks a frame only
        when its whole run is padding: marking the padding alone would leave an input a frame or two
        computed from the padding. So for HuBERT the mask starts at the run after the input's last
        frame."""
        ends = lengths
        if self.kind == "HubertModel":
            run = n // conv_output_length(n, self.kernels, self.strides)  # HuBERT drops the n % frames samples left over
            ends = [conv_output_length(m, self.kernels, self.strides) * run for m in lengths]
        return torch.arange(n)[None, :] >= torch.tensor(ends)[:, None]

