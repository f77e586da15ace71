"""Data sets, torch-free: reading, verifying and locating them (training and eval share it)."""
