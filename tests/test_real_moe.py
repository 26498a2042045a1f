"""The MoEfied SmolLM2 built from the committed files: it is a real Qwen2-MoE, its accelerator
loads by default, and offloaded decoding with every predictor equals transformers' `generate`
with every expert resident (fp32)."""

import pytest
import torch

from analysis.prompts import load_prompts
from m2r2core.config import DecodeConfig
from m2r2core.moe import moefy
from m2r2core.moe.offload import OffloadConfig, load_moe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def moe(real_model_dir):
    """The built MoE in fp32 (its expert store in the model cache)."""
    return load_moe(dtype="float32", threads=2)


def test_the_built_moe_is_a_qwen2_moe_with_the_committed_shape(moe):
    card, _ = moefy.load_trained()
    config = moe.engine.model.config
    assert config.model_type == "qwen2_moe"
    assert (config.num_experts, config.num_experts_per_tok) == (card.n_experts, card.top_k)
    assert config.mlp_only_layers == card.dense_layers
    assert moe.total_experts == (config.num_hidden_layers - len(card.dense_layers)) \
        * card.n_experts
    assert moe.accel is not None, moe.accel_note
    assert moe.engine.tokenizer.chat_template, "prompts must go through the chat template"


def test_offloaded_decoding_equals_generate_for_every_predictor(moe):
    prompt = load_prompts("mt-bench")[0].text
    engine = moe.engine
    ids = torch.tensor([engine.encode(prompt, DecodeConfig(max_new_tokens=16))])
    with torch.inference_mode():
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=16)
    expected = out[0, ids.shape[1]:].tolist()
    cfg = DecodeConfig(max_new_tokens=16, trace=False)
    reference = moe.generate(prompt, cfg, None).run()
    assert reference.token_ids == expected[:len(reference.token_ids)]
    for predictor in ("m2r2", "pregate", "previous", "oracle", "none"):
        run = moe.generate(prompt, cfg, OffloadConfig(capacity=moe.total_experts // 3,
                                                      bandwidth="nvme", predictor=predictor,
                                                      policy="predicted"),
                           reference.routes).run()
        assert run.token_ids == reference.token_ids, predictor


def test_the_default_is_the_distilled_moe_and_the_plain_one_stays_available(moe):
    from m2r2core.moe import distilled
    from m2r2core.moe.offload import store_dir

    if not distilled.exists(moefy.TRAINED_DIR):
        pytest.skip("no distillation committed")
    plain = load_moe(dtype="float32", threads=2, distilled=False)
    assert "distilled" in str(moefy.build()) and "distilled" not in str(moefy.build(
        distilled=False))
    a = moe.engine.parts.layers[3].mlp.experts.down_proj
    b = plain.engine.parts.layers[3].mlp.experts.down_proj
    assert a.shape == b.shape and not torch.equal(a, b)
    assert store_dir(moe.engine) != store_dir(plain.engine)
    assert plain.accel is None and "another build" in plain.accel_note  # trained for the other
    assert moe.trained_fingerprint != plain.trained_fingerprint  # bundles tell them apart
