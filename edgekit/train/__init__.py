"""Training: data preparation, models, losses and the training loop behind ``edgekit train``."""
