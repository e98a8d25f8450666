"""The ``eopd`` subcommands: each module parses its arguments and calls the library; no training logic here."""
