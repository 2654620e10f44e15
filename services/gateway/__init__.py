"""The gateway: Open Inference Protocol in front of the Triton servers, rollouts and rollbacks.

Its parts, one folder or module each:

- :mod:`.dataplane`: what answers clients -- the native lane on the public gRPC and REST ports,
  the Python decision plane behind it, the Triton pool;
- :mod:`.rollout`: what serves -- the rollout state machine, Triton model control, durable
  rollout state, the ModelAdmin service;
- :mod:`.inference_log`: served requests to ``inference.logged``, off the hot path;
- :mod:`.routing`: the routing table, where rollouts meet the data plane;
- :mod:`.status`: the one mapping of failures to gRPC and HTTP statuses;
- :mod:`.app` (the wiring) and :mod:`.settings`.
"""
