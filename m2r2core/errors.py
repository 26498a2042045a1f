"""User-facing errors of the engine: every message says what happened and what to do."""


class M2R2Error(Exception):
    """Base class of every error the app shows to a person instead of a traceback."""


class ConfigError(M2R2Error, ValueError):
    """A configuration field is out of its allowed range."""


class PromptError(M2R2Error, ValueError):
    """The prompt cannot be used as it is (empty, bad characters)."""


class PromptTooLong(PromptError):
    """The prompt plus the token budget does not fit in the model's context."""


class ModelNotFound(M2R2Error):
    """The model name or folder could not be resolved."""


class AssetMissing(M2R2Error):
    """A packaged asset (model file, prompt set) is missing or corrupt."""


class UnsupportedModel(M2R2Error, NotImplementedError):
    """The model's architecture is not one the engine knows how to walk."""


def require(condition: bool, field: str, value: object, allowed: str) -> None:
    """Raise ConfigError naming the field, its value and the allowed range unless condition holds.

    Args:
        condition: what must be true of the value.
        field: the config field's name, as the user sees it.
        value: the offending value.
        allowed: a short description of the allowed values.
    """
    if not condition:
        raise ConfigError(f"{field} = {value!r} is out of range: {allowed}.")


class ArtifactError(AssetMissing):
    """A trained file (adapters, routers, heads, lens, accelerator, MoEfication) is missing,
    corrupt, or was made for another model; the message names both models.
    """


AdapterError = ArtifactError
"""The name the adapter code has always raised; the same class."""
