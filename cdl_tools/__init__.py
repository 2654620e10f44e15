"""cdl's operator tooling: the `cdl` command, the local stack, the demo and the report.

It uses the library (``cdl``) and runs the services; neither imports it (tests/unit/test_layout.py).
"""
