from __future__ import annotations

import pytest

from falco_api.batching import BatchError, frame, unframe
from falco_api.contract.falco import outputs_pb2
from falco_api.contract.falco.api import batch_pb2


def test_frame_is_what_protobuf_encodes_and_unframe_reverses_it() -> None:
    responses = [outputs_pb2.response(rule=f"r{i}", output="x" * (i * 70), seq=i) for i in range(1, 6)]
    payloads = [r.SerializeToString() for r in responses]
    message = frame(payloads)
    assert message == batch_pb2.OutputsBatch(responses=responses).SerializeToString()
    assert unframe(message) == payloads
    assert frame([]) == b"" and unframe(b"") == []


@pytest.mark.parametrize(
    "bad", [b"\x12\x01x", b"\x0a", b"\x0a\x05abc", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"]
)
def test_malformed_batches_are_refused(bad: bytes) -> None:
    with pytest.raises(BatchError):
        unframe(bad)
