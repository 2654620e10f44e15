"""A private descriptor pool for cdl's Open Inference Protocol stubs.

tritonclient registers Triton's own ``inference.*`` messages (a superset of the
same protocol) in protobuf's default pool; cdl's stubs use the same names, so
they are built into this pool instead and both can live in one process. The
wire format, and so every client, is unaffected. scripts/gen_protos.sh applies
this to the generated ``open_inference_pb2.py``.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
