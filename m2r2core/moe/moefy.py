"""MoEfication: turn the dense default model into a Mixture-of-Experts model with distinct experts.

Each layer's MLP intermediate neurons are split by co-activation: the `shared_size` neurons that
matter most on average form an always-on shared expert; the rest are clustered into E routed
experts (neurons that fire on the same tokens share an expert), and a linear router per layer
learns to pick the k routed experts whose outputs matter most for a token. The down projections
are then refitted by least squares so that the sparse MLP reproduces the dense one as well as it
can with the experts the router picks. Layers listed in `dense_layers` stay dense (layer 0 alone
costs 4x in perplexity when sparsified). Top-E is the dense model; top-k a sparse approximation
whose cost `python -m m2r2core.train.moe fit` measures (the card records it).

The result is saved as a standard `Qwen2MoeForCausalLM` folder (routed experts, a gated shared
expert, `mlp_only_layers`), so the engine runs it exactly as it would run a real Qwen2-MoE (or,
through the same code, Mixtral) checkpoint. One reading had to choose: MoEfication sums the
chosen experts' outputs, Qwen2-MoE weights them by the renormalised softmax of the router and
the shared expert by a sigmoid gate. We store each routed expert's down projection times k and
the router times a small `router_scale`, so the k weights are all close to 1/k; the shared gate is
zero (sigmoid 0.5) and its down projection doubled. The choice of experts (a top-k of the same
logits) is unchanged by the scale.

The clustering and the routers are small trained files committed under artifacts/; `build`
refits the down projections and writes the model folder into the model cache in about a minute.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from m2r2core import artifacts
from m2r2core.config import EngineConfig
from m2r2core.errors import ArtifactError, UnsupportedModel
from m2r2core.moe import distilled as distilled_mod
from m2r2core.runtime import corpora
from m2r2core.runtime.model import (
    DEFAULT_MODEL,
    default_cache_dir,
    load,
    resolve_model_dir,
    staged_folder,
)

log = logging.getLogger(__name__)

TRAINED_DIR = artifacts.model_folder("smollm2-135m-moe", artifacts.ARTIFACTS_DIR)
"""The committed MoEfication (clustering and routers) and its route accelerator."""
CARD = "card.json"
WEIGHTS = "moefy.safetensors"
FIT = "python -m m2r2core.train.moe fit"
_COMPLETE_MARK = "m2r2_moe.json"
_BUILD_VERSION = 2
"""Raised when `build` writes something new (2: the chat template is copied too)."""


@dataclass(frozen=True)
class MoeCard:
    """What a MoEfication is: the shape, the data it was fitted on, and its measured cost."""

    base_model: str
    n_experts: int
    top_k: int
    shared_size: int
    """Neurons of each MoE layer's always-on shared expert."""
    dense_layers: list[int]
    """Layers kept dense (Qwen2-MoE's mlp_only_layers)."""
    refit_tokens: int
    """Training tokens of the least-squares refit of the down projections (done by `build`)."""
    router_scale: float
    seed: int
    tokens: int
    """Training tokens (Wikipedia lead sections of the train split) used for both fits."""
    router_steps: int
    metrics: dict
    """Router top-k recall against the oracle and held-out perplexities."""

    @property
    def folder_name(self) -> str:
        """Name of the built MoE folder in the model cache."""
        return f"smollm2-135m-moe-e{self.n_experts}k{self.top_k}s{self.shared_size}"


def fitting_sequences(tokenizer, articles: list[dict], n_tokens: int, seq_len: int, seed: int,
                      progress=None) -> Iterator[list[int]]:
    """Token ids of about n_tokens of fitting text (seeded article order, every other one
    chat-formatted), each cut to seq_len.
    """
    rng = random.Random(seed)
    articles = list(articles)
    rng.shuffle(articles)
    total = 0
    for index, article in enumerate(articles):
        ids = fitting_ids(tokenizer, article, chat=index % 2 == 1, seed=seed + index)[:seq_len]
        if len(ids) < 16:
            continue
        yield ids
        total += len(ids)
        if progress:
            progress(min(total, n_tokens), n_tokens)
        if total >= n_tokens:
            break


def _run_hooked(model, sequences: Iterable[list[int]], hooks: list) -> None:
    """Run the model over each sequence while `hooks` (forward hook handles) collect what they
    need; the hooks are removed afterwards.
    """
    try:
        with torch.inference_mode():
            for ids in sequences:
                model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()


def _mlp_inputs(model, tokenizer, articles: list[dict], n_tokens: int, seq_len: int, seed: int,
                progress=None) -> list[torch.Tensor]:
    """Every layer's MLP input (after the post-attention norm) on about n_tokens of text."""
    layers = model.model.layers
    grabbed: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_hook(
        lambda _m, inputs, _out, i=i: grabbed[i].append(inputs[0][0].detach().float()))
        for i, layer in enumerate(layers)]
    _run_hooked(model, fitting_sequences(tokenizer, articles, n_tokens, seq_len, seed, progress),
                hooks)
    return [torch.cat(rows) for rows in grabbed]


def fitting_ids(tokenizer, article: dict, chat: bool, seed: int) -> list[int]:
    """Token ids of one fitting text: the lead section as plain text, or (chat) as the assistant's
    answer to an instruction about it, in the chat template, so that routers and refits also see
    the template and the assistant's turn, not only encyclopaedic prose.
    """
    if not chat or not tokenizer.chat_template:
        return tokenizer(article["extract"]).input_ids
    template = random.Random(seed).choice(corpora.TEMPLATES)
    question = template.format(title=article["title"], extract=article["extract"][:700],
                               description=article.get("description") or "a topic")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question},
         {"role": "assistant", "content": article["extract"]}], tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def _activations(mlp, x: torch.Tensor) -> torch.Tensor:
    """(T, I) intermediate activations act_fn(gate(x)) * up(x) of a dense Llama MLP."""
    gate = F.linear(x, mlp.gate_proj.weight.float())
    up = F.linear(x, mlp.up_proj.weight.float())
    return F.silu(gate) * up


def refit_down(mlp, x: torch.Tensor, shared: torch.Tensor, experts: torch.Tensor,
               router: torch.Tensor, top_k: int) -> torch.Tensor:
    """(H, I) down projection that best reproduces the dense MLP output from the neurons the
    sparse layer keeps (shared + the router's top-k experts), by ridge least squares.
    """
    act = _activations(mlp, x)
    target = F.linear(act, mlp.down_proj.weight.float())
    picked = (x @ router.T).topk(top_k, -1).indices
    mask = torch.zeros_like(act)
    mask[:, shared.long()] = 1.0
    for e, idx in enumerate(experts.long()):
        mask[:, idx] = (picked == e).any(-1).float()[:, None]
    kept = act * mask
    ridge = 1e-3 * kept.pow(2).mean() * kept.shape[0]
    gram = kept.T @ kept + ridge * torch.eye(kept.shape[1])
    return torch.linalg.solve(gram, kept.T @ target).T


def refit_all(dense, tokenizer, tensors: dict[str, torch.Tensor], card: MoeCard, progress=None
              ) -> dict[int, torch.Tensor]:
    """Refitted down projections of every MoE layer (deterministic: fixed text, fixed seed)."""
    inputs = _mlp_inputs(dense, tokenizer, corpora.wiki_articles("train"), card.refit_tokens,
                         256, card.seed + 1,
                         progress and (lambda d, t: progress("reading text", d, t)))
    downs = {}
    layers = dense.model.layers
    with torch.no_grad():
        for index, (layer, x) in enumerate(zip(layers, inputs)):
            if index in card.dense_layers:
                continue
            downs[index] = refit_down(layer.mlp, x, tensors[f"layers.{index}.shared"],
                                      tensors[f"layers.{index}.experts"],
                                      tensors[f"layers.{index}.router"], card.top_k)
            if progress:
                progress("refitting down projections", index + 1, len(layers))
    return downs


def moe_state(dense, tensors: dict[str, torch.Tensor], card: MoeCard,
              downs: dict[int, torch.Tensor], distilled: dict[str, torch.Tensor] | None = None
              ) -> tuple[object, dict[str, torch.Tensor]]:
    """The Qwen2MoeConfig and state dict of the MoE built from a dense Llama model; with
    `distilled` (distilled.load), its corrections and routers replace the plain MoEfication's.
    """
    from transformers import Qwen2MoeConfig

    dc = dense.config
    if dc.model_type != "llama":
        raise UnsupportedModel(f"MoEfication takes a dense Llama-family model; got "
                               f"'{dc.model_type}'.")
    first = next(k for k in tensors if k.endswith(".experts"))
    n_experts, size = tensors[first].shape
    k = card.top_k
    config = Qwen2MoeConfig(
        vocab_size=dc.vocab_size, hidden_size=dc.hidden_size,
        intermediate_size=dc.intermediate_size, moe_intermediate_size=size,
        shared_expert_intermediate_size=card.shared_size, num_experts=n_experts,
        num_experts_per_tok=k, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=list(card.dense_layers), num_hidden_layers=dc.num_hidden_layers,
        num_attention_heads=dc.num_attention_heads, num_key_value_heads=dc.num_key_value_heads,
        hidden_act=dc.hidden_act, max_position_embeddings=dc.max_position_embeddings,
        rms_norm_eps=dc.rms_norm_eps, rope_parameters=dict(dc.rope_parameters),
        tie_word_embeddings=dc.tie_word_embeddings, qkv_bias=False, use_sliding_window=False,
        bos_token_id=dc.bos_token_id, eos_token_id=dc.eos_token_id, pad_token_id=dc.pad_token_id,
        router_aux_loss_coef=0.0, output_router_logits=False,
    )
    state = {}
    for name, value in dense.state_dict().items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        if ".mlp." not in name or layer in card.dense_layers:
            state[name] = value.float().clone()
    for index, layer in enumerate(dense.model.layers):
        if index in card.dense_layers:
            continue
        mlp, fixes = layer.mlp, distilled or {}
        gate = distilled_mod.corrected(mlp.gate_proj.weight.float(), fixes, index, "gate")
        up = distilled_mod.corrected(mlp.up_proj.weight.float(), fixes, index, "up")
        down = distilled_mod.corrected(downs[index], fixes, index, "down")
        experts = tensors[f"layers.{index}.experts"].long()
        shared = tensors[f"layers.{index}.shared"].long()
        prefix = f"model.layers.{index}.mlp"
        router = fixes.get(f"layers.{index}.router")
        state[f"{prefix}.gate.weight"] = router.float().clone() if router is not None else \
            tensors[f"layers.{index}.router"].float() * card.router_scale
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([gate[idx], up[idx]]) for idx in experts])
        state[f"{prefix}.experts.down_proj"] = torch.stack([down[:, idx] * k for idx in experts])
        state[f"{prefix}.shared_expert.gate_proj.weight"] = gate[shared].clone()
        state[f"{prefix}.shared_expert.up_proj.weight"] = up[shared].clone()
        state[f"{prefix}.shared_expert.down_proj.weight"] = down[:, shared] * 2.0
        state[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, dc.hidden_size)
    if dc.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, state


def moe_model(config, state: dict[str, torch.Tensor]):
    """A Qwen2MoeForCausalLM in eval mode holding exactly `state` (the head tied)."""
    from transformers import Qwen2MoeForCausalLM

    torch.manual_seed(0)
    moe = Qwen2MoeForCausalLM(config)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise UnsupportedModel(f"The MoE state does not fit Qwen2-MoE: missing {missing}, "
                               f"unexpected {unexpected}.")
    moe.tie_weights()
    return moe.eval()


def load_trained(folder: Path = TRAINED_DIR) -> tuple[MoeCard, dict[str, torch.Tensor]]:
    """The committed clustering and routers, checked; ArtifactError names a missing, corrupt or
    inconsistent file.
    """
    card, _ = artifacts.read_record(folder, CARD, MoeCard, "MoEfication", FIT)
    tensors = artifacts.load_tensors(folder, WEIGHTS, "MoEfication", FIT)
    try:
        n_layers = len(card.metrics["router_recall_by_layer"]) + len(card.dense_layers)
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"The MoEfication card in {folder} is corrupt ({err}); rerun "
                            f"`{FIT}` or restore it.") from err
    expected = {f"layers.{i}.{k}" for i in range(n_layers) if i not in card.dense_layers
                for k in ("shared", "experts", "router")}
    if set(tensors) != expected:
        raise ArtifactError(f"{folder / WEIGHTS} does not hold the tensors its card describes; "
                            f"rerun `{FIT}` or restore it.")
    return card, tensors


def files_digest(folder: Path = TRAINED_DIR, distilled: bool = True) -> str:
    """sha256 of the committed MoEfication weights, and of the distillation when there is one and
    `distilled`: what an accelerator was trained against.
    """
    import hashlib

    paths = [folder / WEIGHTS] + ([folder / distilled_mod.WEIGHTS]
                                  if distilled and distilled_mod.exists(folder) else [])
    if not paths[0].is_file():
        return ""
    sha = hashlib.sha256(paths[0].read_bytes())
    for path in paths[1:]:
        sha.update(path.read_bytes())
    return sha.hexdigest()


def built_dir(card: MoeCard, cache_dir: Path | None = None, distilled: bool = False) -> Path:
    """Where `build` writes (and the engine finds) the MoE folder."""
    name = card.folder_name + ("-distilled" if distilled else "")
    return Path(cache_dir or default_cache_dir()) / name


def is_built(folder: Path, card: MoeCard, digest: str = "") -> bool:
    """Whether a complete MoE folder of this card (and distillation digest) is there (the mark is
    written last, so a half build never counts, and a refit card rebuilds).
    """
    try:
        return json.loads((folder / _COMPLETE_MARK).read_text()) == _mark(card, digest)
    except (OSError, ValueError):
        return False


def _mark(card: MoeCard, digest: str = "") -> dict:
    return asdict(card) | {"build_version": _BUILD_VERSION} | (
        {"distilled": digest} if digest else {})


def build(trained: Path = TRAINED_DIR, cache_dir: Path | None = None, force: bool = False,
          progress=None, distilled: bool = True) -> Path:
    """Write the MoE folder of the committed MoEfication into the model cache; return it. With
    `distilled` and a distillation beside the MoEfication, the distilled MoE (its own folder).

    Staged in a temporary folder and renamed into place, so an interrupted build leaves nothing
    that loads.
    """
    card, tensors = load_trained(trained)
    fixes, digest = None, ""
    if distilled and distilled_mod.exists(trained):
        _, fixes = distilled_mod.load(trained, card.base_model)
        digest = files_digest(trained)
    target = built_dir(card, cache_dir, distilled=fixes is not None)
    if is_built(target, card, digest) and not force:
        return target
    dense_dir = Path(resolve_model_dir(DEFAULT_MODEL))
    loaded = load(EngineConfig(model=DEFAULT_MODEL, dtype="float32"))
    downs = refit_all(loaded.model, loaded.tokenizer, tensors, card, progress)
    moe = moe_model(*moe_state(loaded.model, tensors, card, downs, fixes))
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(target) as staging:
        moe.save_pretrained(staging)
        for name in os.listdir(dense_dir):  # tokenizer, chat template, generation config
            if name not in ("config.json", "model.safetensors") and not name.startswith("m2r2_"):
                shutil.copy(dense_dir / name, staging / name)
        (staging / _COMPLETE_MARK).write_text(json.dumps(_mark(card, digest), indent=2))
    return target
