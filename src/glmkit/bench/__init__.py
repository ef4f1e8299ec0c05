"""``glmkit bench``: the device's limits, decode speed, streams and time to first token of a model, beside
transformers on the same weights (``shapes`` what is measured, ``measure`` how, ``run`` the order of it,
``report`` the table and the docs section)."""
