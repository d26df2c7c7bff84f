"""Typed exceptions: user input errors carry a message that says what is wrong and how to fix it."""


class HapsError(Exception):
    """Base class of all haps errors."""


class ConfigError(HapsError, ValueError):
    """A configuration value is invalid or inconsistent."""


class ShapeError(HapsError, ValueError):
    """A tensor has the wrong shape; the message names expected and given shapes."""


class ModelLoadError(HapsError, RuntimeError):
    """A model could not be found or loaded."""


class DataError(HapsError, ValueError):
    """An input record is malformed; the message names the file and line."""
