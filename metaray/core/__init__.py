"""The numerical core: policies, rollouts, advantages, seeding, the worker's task logic. No Ray."""
