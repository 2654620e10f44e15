from __future__ import annotations

import subprocess
from pathlib import Path


def test_generated_stubs_match_the_protos(repo_root: Path) -> None:
    result = subprocess.run(
        ["bash", "scripts/gen_protos.sh", "--check"], cwd=repo_root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "protobuf stubs match proto/" in result.stdout


def test_inference_service_has_the_open_inference_name() -> None:
    from cdl.v1 import open_inference_pb2

    service = open_inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} >= {"ModelInfer", "ModelMetadata", "ServerReady", "ModelReady"}
