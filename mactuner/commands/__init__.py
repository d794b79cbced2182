"""One module per ``python -m mactuner`` command (see :mod:`mactuner.cli`)."""
