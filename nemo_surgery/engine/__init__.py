"""The localization engine: model loading, value layers, hooks, the memorization score, statistics, selection and scan."""
