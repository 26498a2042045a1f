"""Load the tokenizer and model: the packaged SmolLM2 default (prepared once into a cached HF
folder), any local HF causal-LM folder, or a hub name when the hub is reachable.

Run `python -m m2r2core.runtime.model prepare [--force]` to build the cached folder ahead of time.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from m2r2core.config import DEFAULT_MODEL, EngineConfig
from m2r2core.errors import AssetMissing, ModelNotFound
from m2r2core.runtime import assets

log = logging.getLogger(__name__)

PREPARED_NAME = "smollm2-135m-instruct"
_COMPLETE_MARK = "m2r2_prepared.json"
_PREPARE_VERSION = 1


@dataclass(frozen=True)
class ModelInfo:
    """What the UI and traces say about the loaded model."""

    name: str
    model_type: str
    n_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int
    n_params: int
    dtype: str
    device: str
    fingerprint: str
    """Hash of name-independent facts: architecture sizes and the unembedding's first rows."""


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its tokenizer; read-only after loading."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo


def default_cache_dir() -> Path:
    """Folder for prepared models: $M2R2_CACHE, else ~/.cache/m2r2studio."""
    return Path(os.environ.get("M2R2_CACHE", Path.home() / ".cache" / "m2r2studio"))


def prepare_default_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Convert the packaged GGUF into a plain HF folder once; return the folder.

    The folder is written under a temporary name and renamed into place only when complete, so
    an interrupted preparation never leaves a folder that later loads. A file lock keeps two
    processes from converting at once.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / PREPARED_NAME
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{PREPARED_NAME}.lock"):
        if _is_complete(target) and not force:
            return target
        gguf_path = assets.verify(assets.SMOLLM2_GGUF)
        with staged_folder(target) as staging:
            _convert_gguf(gguf_path, staging)
    return target


@contextlib.contextmanager
def staged_folder(target: Path):
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename,
    on failure it is removed, so an interrupted write never leaves a folder that loads.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_complete(folder: Path) -> bool:
    mark = folder / _COMPLETE_MARK
    if not mark.is_file():
        return False
    try:
        return json.loads(mark.read_text()).get("version") == _PREPARE_VERSION
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path):
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise the GGUF and save safetensors + a tokenizer that fixes the known faults."""
    folder, name = str(gguf_path.parent), gguf_path.name
    log.info("De-quantising %s (about 15 s)", gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                          dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises many types on a damaged file
        raise AssetMissing(
            f"Could not read {gguf_path}: {exc}. Fix: {assets.SMOLLM2_GGUF.fix_command}"
        ) from exc
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # 5.x refuses to save a model it thinks is quantized
    config.rope_theta = config.rope_parameters["rope_theta"]  # 4.x reads the top-level key
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    model.generation_config.bos_token_id = 1
    model.save_pretrained(out_dir)
    # Known GGUF tokenizer faults (../shared/ASSETS.md): no BOS, EOS = pad = <|im_end|>.
    tokenizer.add_bos_token = False
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token = (
        "<|im_end|>", "<|im_end|>", "<|endoftext|>",
    )
    tokenizer.save_pretrained(out_dir)
    _patch_tokenizer_config(out_dir / "tokenizer_config.json")
    (out_dir / _COMPLETE_MARK).write_text(
        json.dumps({"version": _PREPARE_VERSION, "source": f"{assets.SMOLLM2_GGUF.package}"
                    f"=={assets.SMOLLM2_GGUF.version}/{gguf_path.name}"})
    )


def _patch_tokenizer_config(path: Path) -> None:
    data = json.loads(path.read_text())
    data.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False,
                eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    path.write_text(json.dumps(data, indent=2))


def resolve_model_dir(name: str) -> str:
    """Map a user's model choice to something from_pretrained takes."""
    if name == DEFAULT_MODEL:
        return str(prepare_default_model())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is a folder but has no config.json: not an HF model.")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not org/name
        raise ModelNotFound(f"No model folder at {path}. Give an existing HF folder, "
                            f"'{DEFAULT_MODEL}', or a hub name such as "
                            "'HuggingFaceTB/SmolLM2-135M'.")
    if not hub_reachable():
        raise ModelNotFound(
            f"Unknown model '{name}': it is not '{DEFAULT_MODEL}', not a local folder, and the "
            "model hub cannot be reached from this machine to look it up."
        )
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection quickly (offline machines fail at once,
    instead of after the hub client's minute of retries).
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def pick_device(requested: str) -> torch.device:
    """'auto' is CUDA when available, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelNotFound("device = 'cuda' was asked for but no CUDA device is available.")
    return torch.device(requested)


def load(cfg: EngineConfig) -> LoadedModel:
    """Load tokenizer and model for an EngineConfig, in eval mode, with sdpa attention; set
    torch's thread count when the config names one.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = resolve_model_dir(cfg.model)
    device = pick_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                     attn_implementation="sdpa")
    except OSError as exc:
        raise ModelNotFound(_not_found_message(cfg.model, source, exc)) from exc
    except Exception as exc:  # safetensors, json and torch each raise their own types
        raise AssetMissing(
            f"The model files at {source} could not be loaded ({exc}). If this is the prepared "
            f"default, rebuild it: python -m m2r2core.runtime.model prepare --force"
        ) from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, _model_info(cfg.model, model, cfg.dtype, device))


def _not_found_message(name: str, source: str, exc: Exception) -> str:
    if Path(source).is_dir():
        return (f"The model folder {source} is incomplete or corrupt ({exc}). If this is the "
                f"prepared default, rebuild it: python -m m2r2core.runtime.model prepare --force")
    return (f"Unknown model '{name}': it is not '{DEFAULT_MODEL}', not a local folder, and the "
            f"hub could not provide it (this machine may be offline).")


def _model_info(name: str, model: torch.nn.Module, dtype: str, device: torch.device) -> ModelInfo:
    config = model.config
    return ModelInfo(
        name=name,
        model_type=config.model_type,
        n_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        context_length=config.max_position_embeddings,
        n_params=sum(p.numel() for p in model.parameters()),
        dtype=dtype,
        device=str(device),
        fingerprint=fingerprint(model),
    )


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture and the unembedding, equal across dtypes and devices."""
    config = model.config
    head = model.get_output_embeddings().weight[:64].detach()
    rows = head.to("cpu", torch.bfloat16).float().numpy().tobytes()
    shape = (f"{config.model_type}:{config.num_hidden_layers}:{config.hidden_size}:"
             f"{config.vocab_size}")
    return hashlib.sha256(shape.encode() + rows).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m m2r2core.runtime.model prepare [--force]`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = prepare_default_model(args.cache_dir, force=args.force)
    log.info("Prepared model folder: %s", folder)
    log.info("%s", json.dumps(AutoConfig.from_pretrained(folder).to_dict()["architectures"]))


if __name__ == "__main__":
    main()
