"""Reproducibility bundles: one JSON file that holds a run's prompt, every setting, the versions,
the model's and the trained files' fingerprints, and the run's records, so that any page can
re-open it and show that run again without regenerating.

Every page downloads and opens the same format; what differs is the `kind` of record inside:

- `trace`: a plain (traced) generation, RunTrace (Residual Dynamics);
- `exit`: an early-exit comparison, analysis.compare.ExitComparison (Exit Threshold debugger);
- `spec`: a speculative comparison, SpecComparison (Speculative Decoding);
- `experts`: an offloaded MoE comparison, ExpertComparison (Expert Loading).

A bundle is refused (BundleError, and the page keeps what it showed) when it is not JSON, not a
bundle, of a newer format, of another kind than the page shows, made with another model or other
trained files (the message names both), or when its records do not rebuild.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from analysis.compare import ExitComparison, ExpertComparison, SpecComparison
from m2r2core.engine import environment
from m2r2core.errors import M2R2Error
from m2r2core.trace import RunTrace

FORMAT = "m2r2studio-bundle"
VERSION = 1
"""1: the first bundle format (records: trace schema 3, comparisons as analysis.compare)."""

PAGES = {"trace": "Residual Dynamics", "exit": "Exit Threshold debugger",
         "spec": "Speculative Decoding", "experts": "Expert Loading"}
"""Which page opens which kind."""

_HEAD = re.compile(r'\s*\{\s*"format"\s*:\s*"' + FORMAT + '"')
_RECORDS = {"exit": ExitComparison, "spec": SpecComparison, "experts": ExpertComparison}
MAX_BYTES = 64 * 1024 * 1024


class BundleError(M2R2Error):
    """A bundle that cannot be opened here; the message says why and what to do."""


@dataclass(frozen=True)
class Owner:
    """What a run was made with: the model, and the trained files loaded beside it."""

    model_name: str
    model_fingerprint: str
    trained: str
    """Fingerprint of the trained files the run used ('none' without any)."""
    trained_label: str = ""
    """Where they came from, for messages (a folder name)."""


def owner_of(engine) -> Owner:
    """The Owner of runs made by an Engine or an OffloadEngine (duck-typed: both expose
    `trained_fingerprint` and `trained_label`).
    """
    inner = getattr(engine, "engine", engine)
    return Owner(inner.info.name, inner.info.fingerprint, engine.trained_fingerprint,
                 engine.trained_label)


def record_json(kind: str, record: object) -> str:
    """The record part of a bundle as JSON text: nearly all of a bundle's size and time (about
    0.5 s for 256 tokens of an exit comparison), so a page keeps it per record (`dumps`'s
    `record_text`) and only the small envelope is written again when a setting changes.
    """
    if kind not in PAGES:
        raise ValueError(f"unknown bundle kind {kind!r}")
    if kind == "trace":
        return record.to_json()
    return json.dumps(record.to_dict(), ensure_ascii=False)


def dumps(kind: str, record: object, owner: Owner, prompt: str, settings: dict,
          record_text: str | None = None) -> str:
    """The bundle of one run as JSON text; `record_text` is `record_json(kind, record)` when the
    caller already has it.
    """
    body = record_json(kind, record) if record_text is None else record_text
    head = json.dumps(dict(
        format=FORMAT, version=VERSION, kind=kind,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        owner=asdict(owner), prompt=prompt, settings=settings, environment=environment(),
        record=None), ensure_ascii=False)
    # "record" is the last key: its null becomes the record's text
    return head[:-len("null}")] + body + "}"


def is_bundle(data: str | bytes) -> bool:
    """Whether some JSON text is a bundle (rather than, say, a bare trace), from its first key
    (`dumps` writes "format" first), without parsing the whole file.
    """
    head = data[:200].decode("utf-8", "ignore") if isinstance(data, bytes) else data[:200]
    return _HEAD.match(head) is not None


@dataclass(frozen=True)
class Opened:
    """A bundle re-opened: its record and what it says about the run."""

    kind: str
    record: object
    prompt: str
    settings: dict
    owner: Owner
    created: str
    environment: dict


def loads(data: str | bytes, kind: str, owner: Owner) -> Opened:
    """Open a bundle for a page showing `kind`, made by `owner`'s model and trained files.

    Raises BundleError with the reason (see the module docstring).
    """
    if len(data) > MAX_BYTES:
        raise BundleError(f"The file is {len(data) / 1e6:.0f} MB; a bundle is at most "
                          f"{MAX_BYTES // 2**20} MB. Is it the right file?")
    try:
        bundle = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"The file is not valid JSON ({exc}); it may be truncated or "
                          "edited. Download the bundle again.") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise BundleError("The file is not an M2R2 Studio bundle (download one with a page's "
                          "'Download bundle' button).")
    if not isinstance(bundle.get("version"), int) or bundle["version"] > VERSION:
        raise BundleError(f"The bundle is of format version {bundle.get('version')}; this app "
                          f"reads up to {VERSION}. Update the app.")
    theirs = bundle.get("kind")
    if theirs != kind:
        page = PAGES.get(theirs, "no page")
        raise BundleError(f"This bundle holds a {theirs!r} run, which the {page} page opens; "
                          f"this page opens {kind!r} runs.")
    try:
        made = Owner(**bundle["owner"])
        record = _record(kind, bundle["record"])
        opened = Opened(kind, record, str(bundle["prompt"]), dict(bundle["settings"]), made,
                        str(bundle["created"]), dict(bundle["environment"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"The bundle is damaged ({type(exc).__name__}: {exc}); it may have "
                          "been edited. Download it again.") from None
    _check_owner(made, owner)
    return opened


def _record(kind: str, body: dict) -> object:
    if kind == "trace":
        return RunTrace.from_json(json.dumps(body))
    return _RECORDS[kind].from_dict(body)


def _check_owner(made: Owner, here: Owner) -> None:
    if made.model_fingerprint != here.model_fingerprint:
        raise BundleError(
            f"This bundle was made with the model '{made.model_name}' (fingerprint "
            f"{made.model_fingerprint[:12]}); the app has '{here.model_name}' loaded "
            f"({here.model_fingerprint[:12]}). Load that model in the sidebar to open it.")
    if made.trained != here.trained:
        raise BundleError(
            f"This bundle was made with other trained files ({made.trained_label or 'none'}, "
            f"fingerprint {made.trained[:12]}) than the ones loaded now "
            f"({here.trained_label or 'none'}, {here.trained[:12]}); its exit rules and "
            "drafts would not re-decide the same. Load those files to open it.")
