"""Trained files: where they live, and the one way every kind is written and read back.

An artifact (adapters, routers, Medusa heads, tuned lens, MoE route accelerator, MoEfication) is
a safetensors weights file and a JSON card in one folder. The card names the base model the
weights belong to (name and fingerprint). Writes are atomic: both files go to temporary names
and are renamed, weights first and card last, so a card never describes weights that are not
there. Reads check the card against the loaded model and refuse a mismatch with ArtifactError,
whose message names both models.

The committed artifacts live in the repository's `artifacts/<model>/` folder, outside the code
package; `$M2R2_TRAINED_DIR` points the engine elsewhere (tests, a training run's output).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from m2r2core.errors import ArtifactError

ARTIFACTS_ENV = "M2R2_TRAINED_DIR"
ARTIFACTS_DIR = Path(__file__).resolve().parent.parent / "artifacts"
TRAINING_LOG = "adapters_log.json"
"""The committed adapters' training curve (held-out evaluations, thinned step metrics)."""
HISTORY = "adapters_history.json"
"""Every committed adapter state: cumulative training tokens and test agreement by depth."""
"""The committed trained files, one folder per model (the README names it)."""


def artifacts_dir() -> Path:
    """Where trained files are looked for: $M2R2_TRAINED_DIR when set, else ARTIFACTS_DIR."""
    return Path(os.environ.get(ARTIFACTS_ENV) or ARTIFACTS_DIR)


def model_folder(model_name: str, root: Path | None = None) -> Path:
    """The folder of one model's trained files (a hub-style name's '/' becomes '--')."""
    return Path(root or artifacts_dir()) / model_name.replace("/", "--")


def digest(paths: list[Path]) -> str:
    """A fingerprint of some trained files' bytes (the ones that exist), 'none' when none do:
    reproducibility bundles name the trained files a run used by it.
    """
    sha = hashlib.sha256()
    found = False
    for path in paths:
        if Path(path).is_file():
            sha.update(Path(path).name.encode())
            sha.update(Path(path).read_bytes())
            found = True
    return sha.hexdigest()[:16] if found else "none"


def portable(text: str) -> str:
    """A command line or path as a committed report may hold it: the working folder's paths
    relative to it, the home folder written as ~ (no path of this machine).
    """
    return text.replace(str(Path.cwd()) + "/", "").replace(str(Path.home()) + "/", "~/")


def write_json(path: Path, body: object, indent: int | None = 1) -> None:
    """Write a JSON file atomically (a temporary name, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=indent) + "\n")
    tmp.replace(path)


def save(folder: Path, weights_file: str, tensors: dict[str, torch.Tensor], card_file: str,
         card: dict) -> None:
    """Write weights and card into folder atomically (temporary names, then renamed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_weights = folder / (weights_file + ".tmp")
    tmp_card = folder / (card_file + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp_weights))
    tmp_card.write_text(json.dumps(card, indent=2) + "\n")
    tmp_weights.replace(folder / weights_file)
    tmp_card.replace(folder / card_file)


def read_card(folder: Path, card_file: str, what: str, remedy: str) -> dict:
    """The JSON card of an artifact; ArtifactError when it is missing or corrupt.

    Args:
        what: the artifact as a person calls it ("adapters", "Medusa heads", ...).
        remedy: the command that makes it, quoted in the messages.
    """
    path = Path(folder) / card_file
    if not path.is_file():
        raise ArtifactError(f"No {what} card at {path}. Make the {what} with `{remedy}`, or "
                            "pick another folder.")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ArtifactError(f"The {what} card {path} is corrupt ({err}); rerun `{remedy}` or "
                            "restore it.") from err
    if not isinstance(card, dict):
        raise ArtifactError(f"The {what} card {path} is corrupt (not a JSON object); rerun "
                            f"`{remedy}` or restore it.")
    return card


def read_record(folder: Path, card_file: str, record: type, what: str, remedy: str
                ) -> tuple[object, dict]:
    """An artifact's card as its dataclass `record`, and as the raw dict; ArtifactError when
    the card is missing, corrupt, or has fields the record does not know.
    """
    raw = read_card(folder, card_file, what, remedy)
    try:
        return record(**raw), raw
    except TypeError as err:
        raise ArtifactError(f"The {what} card in {folder} is corrupt ({err}); rerun `{remedy}` "
                            "or restore it.") from err


def check_model(card: dict, folder: Path, what: str, model_name: str, model_fingerprint: str,
                **shape: tuple[object, object]) -> None:
    """Refuse an artifact made for another model, naming both.

    Args:
        card: the artifact's card; its 'model_fingerprint' must equal model_fingerprint.
        shape: further fields that must agree, as name=(the card's value, the model's value).
    """
    found = card.get("model_fingerprint")
    wrong = [name for name, (theirs, ours) in shape.items() if theirs != ours]
    if found == model_fingerprint and not wrong:
        return
    detail = "".join(f", {name} {shape[name][0]}" for name in wrong)
    ours = "".join(f", {name} {shape[name][1]}" for name in wrong)
    raise ArtifactError(
        f"The {what} in {folder} were trained for '{card.get('model_name', '?')}' (fingerprint "
        f"{found}{detail}); the loaded model is '{model_name}' (fingerprint {model_fingerprint}"
        f"{ours}). Load the model they were trained for, or train {what} for this one.")


def load_tensors(folder: Path, weights_file: str, what: str, remedy: str
                 ) -> dict[str, torch.Tensor]:
    """The weights of an artifact; ArtifactError when the file is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / weights_file
    try:
        return load_file(str(path))
    except (SafetensorError, FileNotFoundError, OSError, RuntimeError) as err:
        raise ArtifactError(f"The {what} weights in {folder} could not be loaded ({err}); rerun "
                            f"`{remedy}` or restore them.") from err


def fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], folder: Path, what: str,
         remedy: str) -> torch.nn.Module:
    """Load tensors (as float32) into module, frozen and in eval mode; ArtifactError when they do
    not fit it.
    """
    try:
        module.load_state_dict({k: v.float() for k, v in tensors.items()})
    except (RuntimeError, KeyError) as err:
        raise ArtifactError(f"The {what} weights in {folder} do not match their card ({err}); "
                            f"rerun `{remedy}` or restore them.") from err
    return module.requires_grad_(False).eval()
