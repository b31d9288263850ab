"""Metrics: accuracy-matrix summaries (:mod:`.accuracy`) and efficiency (:mod:`.efficiency`)."""
