"""The one base class of "the user's input is wrong" errors, so every command prints them the same way.

Each concern raises its own subclass (``ConfigError``, ``ModelLoadError``, ``CheckpointError``,
``PromptFormatError``, ``FolderExistsError``, the data errors of ``eopd.tasks``) with a message that names
what is wrong and how to fix it; the command-line layer catches ``UserError`` and prints that one line
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, data, checkpoint, model, server): the message is the whole story."""
