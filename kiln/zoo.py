"""The example model zoo: small, real-shaped PyTorch models, deterministic by seed.

Each model is built under a seeded, forked torch RNG (so building one never
disturbs the caller's global RNG) and then re-initialized so that activations
stay O(1) and every normalization has non-trivial parameters: BatchNorm running
statistics are calibrated on random data and then perturbed, LayerNorm/RMSNorm
weights are ``1 + noise`` and biases small noise, so that folding passes have
real work to do. Attention is written out as explicit
``softmax(Q @ K^T * scale + mask) @ V`` so that the exported ONNX graph shows
each step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    import onnx

__all__ = ["ZOO", "ZooModel", "get", "input_names", "names", "onnx_model", "output_names"]


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: how to build the module and its example inputs for a seed."""

    name: str
    description: str
    build: Callable[[int], nn.Module]
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...] = ("logits",)


# ------------------------------------------------------------------ initialization


def _init_weights(module: nn.Module, gen: torch.Generator) -> None:
    """Re-initialize every parameter from ``gen`` so that activations stay O(1)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            _normal(m.weight, math.sqrt(2.0 / fan_in), gen)
            if m.bias is not None:
                _normal(m.bias, 0.02, gen)
        elif isinstance(m, nn.Linear):
            _normal(m.weight, 1.0 / math.sqrt(m.in_features), gen)
            if m.bias is not None:
                _normal(m.bias, 0.02, gen)
        elif isinstance(m, nn.Embedding):
            _normal(m.weight, 1.0, gen)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, RMSNorm)):
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
            if getattr(m, "bias", None) is not None:
                _normal(m.bias, 0.1, gen)


def _normal(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Fill ``t`` in place with N(0, std^2) samples drawn from ``gen``."""
    with torch.no_grad():
        t.copy_(std * torch.randn(t.shape, generator=gen))


def _calibrate_batch_norm(module: nn.Module, batch: torch.Tensor, gen: torch.Generator) -> None:
    """Set BatchNorm running stats from a random batch, then perturb them, so eval BN is non-trivial."""
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.train()
    with torch.no_grad():
        module(batch)
        for bn in bns:
            bn.momentum = 0.1
            bn.running_mean.add_(0.05 * torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.mul_(torch.empty(bn.running_var.shape).uniform_(0.8, 1.25, generator=gen))
    module.eval()


def _seeded_build(factory: Callable[[], nn.Module], seed: int,
                  finish: Callable[[nn.Module, torch.Generator], None] | None = None) -> nn.Module:
    """Build ``factory()`` deterministically from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory()
    gen = torch.Generator().manual_seed(seed)
    _init_weights(module, gen)
    if finish is not None:
        finish(module, gen)
    return module.eval()


def _generator(seed: int, salt: int) -> torch.Generator:
    """A generator for example inputs, separate from the weight stream of the same seed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + salt)


# ------------------------------------------------------------------ shared blocks


class RMSNorm(nn.Module):
    """RMSNorm written out as HF LLaMA does: x * rsqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, H, T, D/H]."""
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, Dh] -> [B, T, H*Dh]."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).contiguous().view(b, t, h * dh)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and explicit softmax(QK^T/sqrt(d))V."""

    def __init__(self, d: int, n_heads: int, causal: bool, max_len: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.scale = 1.0 / math.sqrt(d // n_heads)
        self.causal = causal
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        if causal:
            mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
            self.register_buffer("mask", mask.view(1, 1, max_len, max_len), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)
        q, k, v = (_split_heads(z, self.n_heads) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * self.scale
        if self.causal:
            att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
        att = torch.softmax(att, dim=-1)
        return self.proj(_merge_heads(att @ v))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, the transformer feed-forward block."""

    def __init__(self, d: int, hidden: int, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PreLNBlock(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(x)): the GPT-2 / ViT block."""

    def __init__(self, d: int, n_heads: int, causal: bool, max_len: int, approximate: str) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, n_heads, causal, max_len)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = Mlp(d, 4 * d, approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


# ------------------------------------------------------------------ resnet


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a (projected when the shape changes) shortcut, then relu."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: stem, three stages of basic blocks (16/32/64), avgpool, linear head."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def _build_resnet(seed: int) -> nn.Module:
    """ResNet with BN stats calibrated on a seeded random batch."""
    def finish(m: nn.Module, gen: torch.Generator) -> None:
        _calibrate_batch_norm(m, torch.randn(8, 3, 32, 32, generator=gen), gen)
    return _seeded_build(ResNet, seed, finish)


# ------------------------------------------------------------------ gpt


class GPT(nn.Module):
    """A Pre-LN GPT-2-style decoder with learned positions, tanh-GELU MLP and an untied LM head."""

    def __init__(self, vocab: int = 512, d: int = 256, n_heads: int = 4, n_layers: int = 4, max_len: int = 128) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(PreLNBlock(d, n_heads, True, max_len, "tanh") for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# ------------------------------------------------------------------ vit


class ViT(nn.Module):
    """A Pre-LN ViT-tiny: conv patch embedding, cls token, learned positions, erf-GELU MLP."""

    def __init__(self, image: int = 32, patch: int = 4, d: int = 192, n_heads: int = 3, n_layers: int = 4,
                 classes: int = 10) -> None:
        super().__init__()
        n_patches = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, d))
        self.blocks = nn.ModuleList(PreLNBlock(d, n_heads, False, n_patches + 1, "none") for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def _build_vit(seed: int) -> nn.Module:
    """ViT with a random cls token and position table (zeros would make them dead weights)."""
    def finish(m: nn.Module, gen: torch.Generator) -> None:
        _normal(m.cls_token, 1.0, gen)
        _normal(m.pos_embed, 0.5, gen)
    return _seeded_build(ViT, seed, finish)


# ------------------------------------------------------------------ llama


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim, as in HF LLaMA."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAttention(nn.Module):
    """Bias-free attention with rotary embeddings (rotate_half form) and an additive causal mask."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.sqrt_head_dim = math.sqrt(d // n_heads)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.q_proj(x), self.n_heads)
        k = _split_heads(self.k_proj(x), self.n_heads)
        v = _split_heads(self.v_proj(x), self.n_heads)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        att = torch.matmul(q, k.transpose(2, 3)) / self.sqrt_head_dim + mask
        att = torch.softmax(att, dim=-1)
        return self.o_proj(_merge_heads(torch.matmul(att, v)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), the LLaMA feed-forward block."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """x + attn(rmsnorm(x)), then + mlp(rmsnorm(x))."""

    def __init__(self, d: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(d)
        self.self_attn = LlamaAttention(d, n_heads)
        self.post_attention_layernorm = RMSNorm(d)
        self.mlp = SwiGLU(d, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """A LLaMA-style decoder: RMSNorm, RoPE computed from positions in forward, SwiGLU, no biases."""

    def __init__(self, vocab: int = 512, d: int = 256, n_heads: int = 4, n_layers: int = 2,
                 theta: float = 10000.0) -> None:
        super().__init__()
        head_dim = d // n_heads
        hidden = 256 * math.ceil(int(2 * 4 * d / 3) / 256)
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaBlock(d, n_heads, hidden) for _ in range(n_layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        pos = torch.arange(t, dtype=torch.float32, device=input_ids.device)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        mask = torch.full((t, t), torch.finfo(x.dtype).min, device=x.device).triu(1)[None, None]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


# ------------------------------------------------------------------ bert


class PostLNBlock(nn.Module):
    """ln1(x + attn(x)), then ln2(x + mlp(x)): the original BERT block."""

    def __init__(self, d: int, n_heads: int, max_len: int) -> None:
        super().__init__()
        self.attn = SelfAttention(d, n_heads, False, max_len)
        self.ln1 = nn.LayerNorm(d, eps=1e-12)
        self.mlp = Mlp(d, 4 * d, "none")
        self.ln2 = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class Bert(nn.Module):
    """A small Post-LN BERT encoder: token + position + token-type embeddings, bidirectional, pooler."""

    def __init__(self, vocab: int = 512, d: int = 128, n_heads: int = 2, n_layers: int = 2, max_len: int = 64,
                 type_vocab: int = 2) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(max_len, d)
        self.token_type_embeddings = nn.Embedding(type_vocab, d)
        self.emb_ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(PostLNBlock(d, n_heads, max_len) for _ in range(n_layers))
        self.pooler = nn.Linear(d, d)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        token_type = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type)
        x = self.emb_ln(x)
        for layer in self.layers:
            x = layer(x)
        return x, torch.tanh(self.pooler(x[:, 0]))


# ------------------------------------------------------------------ mlp


class Mlp3(nn.Module):
    """64 -> 128 -> 128 -> 10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------ registry


def _ids(shape: tuple[int, ...], vocab: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """Example-input factory for int64 token ids of ``shape`` drawn from ``[0, vocab)``."""
    return lambda seed: (torch.randint(0, vocab, shape, generator=_generator(seed, 1), dtype=torch.int64),)


def _floats(shape: tuple[int, ...]) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """Example-input factory for a standard-normal float32 tensor of ``shape``."""
    return lambda seed: (torch.randn(shape, generator=_generator(seed, 2)),)


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("resnet", "CIFAR-style ResNet: Conv-BN-ReLU basic blocks 16/32/64, residual adds, avgpool, "
                 "linear head; input f32[1,3,32,32]",
                 _build_resnet, _floats((1, 3, 32, 32)), ("pixel_values",)),
        ZooModel("gpt", "Pre-LN GPT-2-style decoder: d=256, 4 heads, 4 layers, seq 128, vocab 512, causal, "
                 "tanh-GELU MLP, untied LM head; input i64[1,128]",
                 lambda s: _seeded_build(GPT, s), _ids((1, 128), 512), ("input_ids",)),
        ZooModel("vit", "Pre-LN ViT-tiny: 32x32 image, patch 4, d=192, 3 heads, 4 layers, cls token, erf-GELU; "
                 "input f32[1,3,32,32]",
                 _build_vit, _floats((1, 3, 32, 32)), ("pixel_values",)),
        ZooModel("llama", "LLaMA-style decoder: RMSNorm, RoPE, SwiGLU, additive causal mask, d=256, 4 heads, "
                 "2 layers, seq 128, vocab 512, no biases; input i64[1,128]",
                 lambda s: _seeded_build(Llama, s), _ids((1, 128), 512), ("input_ids",)),
        ZooModel("bert", "Post-LN BERT encoder: d=128, 2 heads, 2 layers, seq 64, erf-GELU, token-type "
                 "embeddings, tanh pooler; input i64[1,64]",
                 lambda s: _seeded_build(Bert, s), _ids((1, 64), 512), ("input_ids",),
                 ("last_hidden_state", "pooler_output")),
        ZooModel("mlp", "MLP 64 -> 128 -> 128 -> 10 with ReLU; input f32[4,64]",
                 lambda s: _seeded_build(Mlp3, s), _floats((4, 64)), ("x",)),
    )
}


def names() -> list[str]:
    """The zoo's model names, in registration order."""
    return list(ZOO)


def _entry(name: str) -> ZooModel:
    """The zoo entry called ``name``; KeyError lists the known names."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known models: {', '.join(ZOO)}") from None


def get(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The module (eval mode) and example inputs of zoo model ``name`` for ``seed``."""
    entry = _entry(name)
    return entry.build(seed).eval(), entry.example_inputs(seed)


def input_names(name: str) -> tuple[str, ...]:
    """The graph input names zoo model ``name`` is exported with."""
    return _entry(name).input_names


def output_names(name: str) -> tuple[str, ...]:
    """The graph output names zoo model ``name`` is exported with."""
    return _entry(name).output_names


@functools.cache
def _cached_onnx(name: str, seed: int) -> onnx.ModelProto:
    """Export zoo model ``name`` once per process and seed."""
    from kiln.frontend.torch_export import export

    module, example = get(name, seed)
    return export(module, example, input_names=input_names(name), output_names=output_names(name))


def onnx_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """Zoo model ``name`` exported to ONNX (cached in-process; the caller gets its own copy)."""
    import onnx

    _entry(name)
    model = onnx.ModelProto()
    model.CopyFrom(_cached_onnx(name, seed))
    return model
