"""Verification of a pruned checkpoint: re-score, sample before/after, drift, equivalence, report."""
