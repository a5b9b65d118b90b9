"""The pipeline's core: keys, scripts, reserve → stream → persist → release/compensate, ledger."""
