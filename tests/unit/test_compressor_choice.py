from __future__ import annotations

from services.compressor.compressor import choose
from services.compressor.variants import Measured


def _m(name: str, size: int, acc: float, b32: float = 1.0) -> Measured:
    return Measured(name, size, acc, 0.1, 0.2, b32, b32 * 2, 1.0)


def test_a_variant_over_the_accuracy_budget_is_never_chosen() -> None:
    variants = [_m("fp32", 1000, 0.950), _m("int8-dynamic", 100, 0.940), _m("int8-static", 300, 0.946)]
    chosen, within = choose(variants, budget=0.005, objective="size")
    assert chosen.name == "int8-static"  # the smallest, int8-dynamic, lost 1 point
    assert within == ["fp32", "int8-static"]
    chosen, _ = choose([_m("fp32", 1000, 0.95), _m("int8-static", 300, 0.90)], budget=0.005, objective="size")
    assert chosen.name == "fp32"


def test_objectives() -> None:
    variants = [_m("fp32", 1000, 0.95, b32=1.0), _m("fp16", 500, 0.95, b32=1.0), _m("int8-static", 300, 0.95, b32=0.5)]
    assert choose(variants, 0.005, "gpu")[0].name == "fp16"
    assert choose(variants, 0.005, "cpu_latency")[0].name == "int8-static"
    # size skips a variant that serves batches much slower than fp32
    slow = [_m("fp32", 1000, 0.95, b32=1.0), _m("int8-dynamic", 200, 0.95, b32=5.0)]
    assert choose(slow, 0.005, "size")[0].name == "fp32"
