"""Choosing ranks: per-layer policies (policies.py, a registry), block rules (rules.py), budgets that choose every
layer together (budgets.py, a registry) and the one planning step that resize, merge and analyze share (plan.py).
Numbers in, ranks out: no tensors, no files."""
