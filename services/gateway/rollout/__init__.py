"""Rollouts: what serves, decided and made so.

- :mod:`.machine`: the per-model state machine and its manager (pure logic);
- :mod:`.control`: Triton model control (loading and unloading versions on every server);
- :mod:`.state`: durable rollout state in the object store (a restarted gateway resumes);
- :mod:`.admin`: ``cdl.v1.ModelAdmin``, rollouts inspected and steered (thin transport).

The routing table (:mod:`services.gateway.routing`) is where rollouts meet the data plane: the
manager writes it, the hot path reads it.
"""
