"""The only module that knows transformers internals: where a decoder's parts live, how one layer
is called, how attention masks and caches are made and cropped.

Dispatches on known model types (after tuned-lens `model_surgery`); anything else raises
UnsupportedModel. Tested against the installed transformers in tests/test_hf_compat.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from m2r2core.errors import UnsupportedModel

# Llama-family dense blocks and Mixtral-style sparse MoE blocks share one layer signature.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a decoder-only causal LM that the engine walks itself."""

    config: object
    embed_tokens: torch.nn.Module
    layers: tuple[torch.nn.Module, ...]
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary_emb: torch.nn.Module
    layer_types: tuple[str, ...]
    """'full_attention' or 'sliding_attention' per layer; picks the mask each layer gets."""
    cache_kwarg: str
    """The name under which this transformers version passes the KV cache to a layer."""

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks N."""
        return len(self.layers)


def decoder_parts(model: torch.nn.Module) -> DecoderParts:
    """Return the walkable parts of an HF causal LM, or raise UnsupportedModel."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"Model type '{config.model_type}' is not supported; the engine walks "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models."
        )
    base = model.model
    layers = tuple(base.layers[: config.num_hidden_layers])
    return DecoderParts(
        config=config,
        embed_tokens=base.embed_tokens,
        layers=layers,
        norm=base.norm,
        lm_head=model.lm_head,
        rotary_emb=base.rotary_emb,
        layer_types=_layer_types(config),
        cache_kwarg=_cache_kwarg(type(layers[0]).forward),
    )


def _layer_types(config: object) -> tuple[str, ...]:
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(types[:n])
    sliding = getattr(config, "sliding_window", None) is not None
    return ("sliding_attention" if sliding else "full_attention",) * n


def _cache_kwarg(forward: object) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (deprecated alias until 5.40).
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def new_cache(parts: DecoderParts) -> DynamicCache:
    """An empty KV cache for one sequence."""
    return DynamicCache(config=parts.config)


def cache_length(cache: DynamicCache) -> int:
    """Number of positions held in the cache."""
    return cache.get_seq_length()


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer's keys/values."""
    remove = cache.get_seq_length() - length
    if remove < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} positions to {length}")
    if remove:
        cache.crop(-remove)  # 5.x: a negative count removes that many trailing positions


def attention_masks(
    parts: DecoderParts, hidden: torch.Tensor, cache: DynamicCache, position_ids: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    """Causal masks for a chunk of new positions, keyed by layer type, made as the HF model does.

    Args:
        hidden: (1, T, H) input embeddings of the new positions.
        cache: the cache *before* these positions are added.
        position_ids: (1, T) absolute positions.
    """
    kwargs = dict(config=parts.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
                  position_ids=position_ids)
    masks: dict[str, torch.Tensor | None] = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in parts.layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


def call_layer(
    parts: DecoderParts,
    index: int,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    position_ids: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """Run decoder block `index` on (1, T, H) hidden states, appending its keys/values to cache."""
    out = parts.layers[index](
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        position_embeddings=position_embeddings,
        **{parts.cache_kwarg: cache},
    )
    return out[0] if isinstance(out, tuple) else out  # 4.x returned a tuple


@dataclass(frozen=True)
class BlockParts:
    """One Llama-family block taken apart, for the engine's own block math (stream/accel.py): the
    fast stream swaps the attention's keys/values and adds adapter deltas to projections.
    """

    input_norm: torch.nn.Module
    q_proj: torch.nn.Linear
    k_proj: torch.nn.Linear
    v_proj: torch.nn.Linear
    o_proj: torch.nn.Linear
    post_norm: torch.nn.Module
    mlp: torch.nn.Module
    mlp_proj: tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Linear] | None
    """(gate, up, down) of a dense gated MLP; None for a sparse MoE block (called as a whole)."""
    act_fn: object
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    sliding_window: int | None
    """Keys at positions j with q - window < j <= q are visible; None means all earlier ones."""


def block_parts(parts: DecoderParts, index: int) -> BlockParts:
    """The projections, norms and attention geometry of decoder block `index`."""
    layer = parts.layers[index]
    attn, mlp, config = layer.self_attn, layer.mlp, parts.config
    dense = all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
    head_dim = attn.head_dim
    sliding = parts.layer_types[index] == "sliding_attention"
    return BlockParts(
        input_norm=layer.input_layernorm, q_proj=attn.q_proj, k_proj=attn.k_proj,
        v_proj=attn.v_proj, o_proj=attn.o_proj, post_norm=layer.post_attention_layernorm,
        mlp=mlp, mlp_proj=(mlp.gate_proj, mlp.up_proj, mlp.down_proj) if dense else None,
        act_fn=getattr(mlp, "act_fn", None),
        n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim, scaling=attn.scaling,
        sliding_window=getattr(config, "sliding_window", None) if sliding else None,
    )


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of (B, heads, T, D) queries or keys, as the Llama family does."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def cached_keys_values(cache: DynamicCache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `index`'s cached (1, kv_heads, T, D) keys and values, or (None, None) when empty.

    A sliding-window layer holds only its newest window-1 positions.
    """
    layer = _filled_layer(cache, index)
    return (None, None) if layer is None else (layer.keys, layer.values)


def cached_length(cache: DynamicCache, index: int) -> int:
    """How many positions layer `index` has seen (a sliding layer stores fewer)."""
    layer = _filled_layer(cache, index)
    return 0 if layer is None else int(layer.get_seq_length())


def _filled_layer(cache: DynamicCache, index: int):
    """Layer `index` of the cache once something was written to it, else None."""
    if index >= len(cache.layers) or not getattr(cache.layers[index], "is_initialized", True):
        return None
    return cache.layers[index]


def append_keys_values(cache: DynamicCache, index: int, keys: torch.Tensor,
                       values: torch.Tensor) -> None:
    """Append (1, kv_heads, T, D) keys/values to layer `index` of the cache."""
    cache.update(keys, values, index)
