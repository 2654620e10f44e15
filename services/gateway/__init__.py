"""The gateway: Open Inference Protocol in front of the Triton servers, rollouts and rollbacks."""
