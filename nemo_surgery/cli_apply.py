"""`nemo-surgery apply`: thin CLI over nemo_surgery.apply (being built)."""
