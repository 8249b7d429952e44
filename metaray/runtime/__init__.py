"""The Ray layer: worker and learner actors, the worker pool, cluster connection.

The only engine modules that import ray; everything below them is plain torch/numpy.
"""
