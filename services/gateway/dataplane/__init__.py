"""The gateway's data plane: what answers clients.

- :mod:`.server`: ``inference.GRPCInferenceService`` in Python (the decision plane: keys, routing,
  canary retries, shadow mirroring, the inference log's feed), transport-free at its core;
- :mod:`.lane`: the native lane (Go, ``lane/``) that serves the public gRPC and REST ports and
  hands the Python server what it does not serve itself;
- :mod:`.rest` and :mod:`.http_codec`: the REST/HTTP v2 binding;
- :mod:`.backends`: the Triton servers (pooled channels, least outstanding, health, retries);
- :mod:`.wire`: protobuf wire scanning; :mod:`.statistics`: ModelStatistics summed over servers.
"""
