"""`nemo-surgery stats` and `scan`: thin CLI over the localization engine (being built)."""
