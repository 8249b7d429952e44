"""The training loop and what it leaves behind: run directories, progress, TensorBoard events."""
