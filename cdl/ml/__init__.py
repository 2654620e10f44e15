"""The ML core shared by trainer and tuner: models, preprocessing, the training loop."""
