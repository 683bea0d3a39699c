"""Quality: utility (train on synthetic, test on real) and fidelity."""
