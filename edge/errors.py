"""Errors a user can cause and fix; the CLI prints them as one line, never a traceback."""

from __future__ import annotations


class CytoedgeError(Exception):
    """A problem the user can act on. ``exit_code`` follows the CLI contract (2 = bad config/usage)."""

    exit_code = 1


class ConfigError(CytoedgeError):
    exit_code = 2


class ModelError(CytoedgeError):
    exit_code = 1


class SourceError(CytoedgeError):
    exit_code = 1
