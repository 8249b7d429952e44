"""The algorithm core: pure torch, no Ray, testable without a cluster."""
