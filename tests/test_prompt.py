"""Prompt validation gives clear messages for every kind of bad input."""

import pytest

from m2r2core.config import DecodeConfig
from m2r2core.errors import PromptError, PromptTooLong
from m2r2core.runtime.prompt import check_fits, validate_text


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_prompt(text):
    with pytest.raises(PromptError, match="empty"):
        validate_text(text)


def test_control_character_is_named_with_its_position():
    with pytest.raises(PromptError, match=r"U\+0007 at character 5"):
        validate_text("hello\x07world")


def test_newlines_and_tabs_are_fine():
    assert validate_text("a\nb\tc\r\n") == "a\nb\tc\r\n"


def test_invalid_utf8_bytes():
    with pytest.raises(PromptError, match="not valid UTF-8"):
        validate_text(b"caf\xe9 au lait")


def test_lone_surrogate():
    with pytest.raises(PromptError, match="surrogate"):
        validate_text("bad \udcff text")


def test_prompt_plus_budget_over_context():
    with pytest.raises(PromptTooLong, match="Shorten the prompt by at least 10 tokens"):
        check_fits(500, 22, 512)
    check_fits(490, 22, 512)


def test_engine_refuses_a_prompt_longer_than_context(tiny_engine):
    long_text = "word " * 600  # the tiny model's context is 512 positions
    with pytest.raises(PromptTooLong, match="context holds 512"):
        tiny_engine.run(long_text, DecodeConfig(max_new_tokens=4))


def test_engine_refuses_bad_text_before_computing(tiny_engine):
    with pytest.raises(PromptError):
        tiny_engine.generate("\x00", DecodeConfig(max_new_tokens=4))
