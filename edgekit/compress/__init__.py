"""Compression passes run by the build's optimize stage: structured pruning and fine-tuning with the run's recipe."""
