"""Checkpoint conversion tools: ``python -m conversion hf-to-orbax|orbax-to-hf SRC DST``."""
