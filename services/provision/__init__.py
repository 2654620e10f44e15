"""The provisioning job: cdl's topics, buckets and object-store users, made once before the
services start (a one-shot job in deploy/compose.yml; the local stack does the same itself)."""
