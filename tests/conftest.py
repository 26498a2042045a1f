"""Shared fixtures: seeded tiny random models of each supported family, saved with the real
SmolLM2 tokenizer so text in and out is realistic, and the real model behind the `slow` marker."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.engine import Engine
from m2r2core.runtime.model import prepare_default_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
FAMILIES = ("llama", "mistral", "qwen2", "mixtral")


def tiny_config(family: str) -> AutoConfig:
    """A 4-layer model of the family with SmolLM2's vocabulary and special token ids."""
    extra = {
        "llama": {},
        "mistral": {"sliding_window": 8},
        "qwen2": {},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    }[family]
    return AutoConfig.for_model(
        family, vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True, **extra,
    )


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The prepared SmolLM2 folder (converted once per cache; about 20 s the first time)."""
    return prepare_default_model()


def save_tiny_model(config: AutoConfig, folder: Path, tokenizer_dir: Path, seed: int = 0
                    ) -> Path:
    """A seeded random model of `config` saved in `folder` with the real tokenizer's files."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, real_model_dir) -> dict[str, Path]:
    """Folder per family: a seeded random tiny model plus the real tokenizer files."""
    return {family: save_tiny_model(tiny_config(family),
                                    tmp_path_factory.mktemp(f"tiny-{family}"), real_model_dir)
            for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> Path:
    """The tiny Llama folder, the app tests' stand-in for the real model."""
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir) -> Engine:
    """An fp32 engine on the tiny Llama."""
    return Engine.load(EngineConfig(model=str(tiny_model_dir), dtype="float32"))


@pytest.fixture(scope="session")
def tiny_run(tiny_engine):
    """One traced greedy run of the tiny engine."""
    return tiny_engine.run("The capital of France is", DecodeConfig(max_new_tokens=12))


@pytest.fixture(scope="session")
def real_engine_fp32(real_model_dir) -> Engine:
    """The real SmolLM2 in fp32 (slow tests only)."""
    return Engine.load(EngineConfig(dtype="float32", threads=2))


@pytest.fixture(scope="session")
def tiny_trained_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Adapters, routers, Medusa heads and a tuned lens briefly trained for the tiny Llama (a
    folder of trained folders, as $M2R2_TRAINED_DIR expects)."""
    from m2r2core import train
    from m2r2core.train import distill

    root = tmp_path_factory.mktemp("trained")
    engine_tok = Engine.load(EngineConfig(model=str(tiny_model_dir), dtype="float32")).tokenizer
    corpus = root.parent / "tiny-corpus.jsonl"
    distill.save(distill.text_samples(engine_tok, distill.wiki_articles("train")[:30], 30, 40,
                                      seed=0), corpus)
    out = root / "tiny"
    common = ["--model", str(tiny_model_dir), "--dtype", "float32", "--seq-len", "40",
              "--data", str(corpus), "--out", str(out)]
    old = os.environ.get("M2R2_CACHE")
    os.environ["M2R2_CACHE"] = str(root.parent / "cache")
    try:
        train.main(["adapters", *common, "--steps", "3", "--batch-size", "4",
                    "--kl-positions", "8", "--margin", "0"])
        train.main(["routers", *common, "--check-vocab", "256", "--per-sample", "8",
                    "--epochs", "1"])
        train.main(["medusa", *common, "--heads", "3", "--epochs", "2", "--batch-size", "64"])
        train.main(["lens", *common, "--rank", "8", "--fit-samples", "20", "--steps", "3",
                    "--positions", "16"])
    finally:
        if old is None:
            os.environ.pop("M2R2_CACHE")
        else:
            os.environ["M2R2_CACHE"] = old
    return root
