"""Download and re-open reproducibility bundles (analysis/bundle.py), the same way on every page."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from analysis import bundle
from analysis.bundle import BundleError, Opened, Owner


def download(column, kind: str, record: object, owner: Owner, prompt: str, settings: dict,
             key: str, file_name: str) -> None:
    """A 'Download bundle' button: the prompt, settings, versions, fingerprints and records.

    The file is written with the page (not when pressed): Streamlit's lazy buttons can lose a
    press that lands between reruns and then spin for ever. The record's text, nearly all of the
    file, is written once per record and kept in the session; a changed setting rewrites only
    the envelope.
    """
    column.download_button(
        "Download bundle (JSON)",
        data=bundle.dumps(kind, record, owner, prompt, settings,
                         record_text=record_text(kind, record)),
        file_name=file_name, mime="application/json", key=key,
        help="Everything needed to show this run again: prompt, settings, versions, the model's "
             "and trained files' fingerprints and every record. Open it on this page (any "
             "session, any machine with the same model and trained files) to restore the view "
             "without regenerating.")


def record_text(kind: str, record: object) -> str:
    """`bundle.record_json(kind, record)`, written once per record and kept in the session: the
    bundle's body, and for a trace also the page's "Trace (JSON)" download (the same text).
    """
    return kept(f"bundle_record_{kind}", record, lambda: bundle.record_json(kind, record))


def kept(name: str, record: object, make: Callable[[], str]) -> str:
    """`make()`, written once per record (the same object) and kept in the session under `name`:
    a download's data is written with the page, and a rerun that changes nothing about the
    record must not write it again.
    """
    memo_key = f"{name}_kept"
    memo = st.session_state.get(memo_key)
    if memo is None or memo[0] is not record:
        memo = (record, make())
        st.session_state[memo_key] = memo
    return memo[1]


def open_control(kind: str, owner: Owner, key: str) -> Opened | None:
    """An uploader for a bundle of `kind`: the opened bundle once per new file, else None.

    A bad file shows why (BundleError) and the page keeps what it showed.
    """
    with st.expander("Open a bundle (JSON)"):
        upload = st.file_uploader("Bundle file", type=["json"], key=key,
                                  help=f"A bundle downloaded from the {bundle.PAGES[kind]} page.")
        if upload is None:
            return None
        seen_key = f"{key}_seen"
        file_id = f"{upload.name}:{upload.size}:{getattr(upload, 'file_id', '')}"
        try:
            opened = bundle.loads(upload.getvalue(), kind, owner)
        except BundleError as exc:
            st.error(f"{upload.name} was not opened: {exc} What the page showed is kept.")
            return None
        st.success(f"Opened {upload.name}: made {opened.created} with "
                   f"{opened.owner.model_name}"
                   + (f" and {opened.owner.trained_label}" if opened.owner.trained_label else "")
                   + f" (torch {opened.environment.get('torch', '?')}).")
        if st.session_state.get(seen_key) == file_id:
            return None  # already restored; later reruns keep the user's changes
        st.session_state[seen_key] = file_id
        return opened


def restore(opened: Opened, result_key: str, prompt_key: str, view_keys: tuple[str, ...]) -> None:
    """Put an opened bundle's record, prompt and view controls back into the session (call before
    those widgets are drawn in this run)."""
    st.session_state[result_key] = opened.record
    st.session_state[prompt_key] = opened.prompt
    view = opened.settings.get("view", {})
    for key in view_keys:
        if key in view:
            st.session_state[key] = view[key]
