"""Errors the library raises on bad input. Each message names what was wrong."""


class SpotlightError(ValueError):
    """Base class: bad input to spotlight_attn (a mismatched hasher, an unsupported model, a bad budget...)."""


class UnsupportedModelError(SpotlightError):
    """The model's family or attention layout is not one spotlight_attn can run."""


class HasherMismatchError(SpotlightError):
    """A hasher does not fit the model (or the config) it is used with."""


class CheckpointError(SpotlightError):
    """A hasher file is missing, truncated, corrupt, or of an unknown format."""


class UnsupportedVersionError(SpotlightError):
    """An installed package (transformers) is outside the range spotlight_attn is tested with."""
