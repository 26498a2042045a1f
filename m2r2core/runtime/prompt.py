"""Turning a user's text into model input: validation with clear messages, the chat template,
and the context-length check.
"""

from __future__ import annotations

import unicodedata

from transformers import PreTrainedTokenizerBase

from m2r2core.errors import PromptError, PromptTooLong

MAX_PROMPT_CHARS = 200_000
_ALLOWED_CONTROLS = {"\n", "\t", "\r"}


def validate_text(text: str | bytes) -> str:
    """Return the prompt as a clean str, or raise PromptError saying what is wrong and where."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptError(
                f"The prompt is not valid UTF-8 (byte {exc.start} cannot be decoded). "
                "Paste it again as plain text."
            ) from exc
    if not text or not text.strip():
        raise PromptError("The prompt is empty. Type a question or some text to continue.")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptTooLong(
            f"The prompt has {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}. "
            "Shorten it."
        )
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        if category == "Cs":
            raise PromptError(
                f"The prompt is not valid UTF-8 text (a lone surrogate U+{ord(char):04X} at "
                f"character {index}). Paste it again as plain text."
            )
        if category == "Cc" and char not in _ALLOWED_CONTROLS:
            raise PromptError(
                f"The prompt contains a control character U+{ord(char):04X} at character {index}. "
                "Remove it (only newlines and tabs are allowed)."
            )
    return text


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids for a conversation ending with a user turn, with the generation prompt."""
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)
    return list(tokenizer(templated, add_special_tokens=False)["input_ids"])


def encode(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    use_chat_template: bool = True,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids for a user turn, with the chat template's generation prompt when it has one."""
    if use_chat_template and tokenizer.chat_template:
        messages = [{"role": "user", "content": text}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return encode_messages(tokenizer, messages)
    return list(tokenizer(text)["input_ids"])


def check_fits(prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
    """Raise PromptTooLong unless prompt plus budget fit in the model's context."""
    needed = prompt_tokens + max_new_tokens
    if needed > context_length:
        over = needed - context_length
        raise PromptTooLong(
            f"The prompt is {prompt_tokens:,} tokens; with a budget of {max_new_tokens:,} new "
            f"tokens it needs {needed:,} positions, but the model's context holds "
            f"{context_length:,}. Shorten the prompt by at least {over:,} tokens or lower the "
            "token budget."
        )
