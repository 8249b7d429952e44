"""Held-out evaluation, the comparison policies (random, pretrained, PPO), plots and tables."""
