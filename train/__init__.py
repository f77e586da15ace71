"""modrt.train: modular networks and their EM training (needs torch: the ``train`` extra)."""
