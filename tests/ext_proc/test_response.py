"""The ProcessingResponse builders: each continue answers its own phase and changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc import response

CONTINUES: list[tuple[Callable[[], pb.ProcessingResponse], str]] = [
    (response.continue_request_headers, "request_headers"),
    (response.continue_response_headers, "response_headers"),
    (response.continue_request_body, "request_body"),
    (response.continue_response_body, "response_body"),
    (lambda: response.continue_trailers(False), "request_trailers"),
    (lambda: response.continue_trailers(True), "response_trailers"),
]


@pytest.mark.parametrize(("build", "phase"), CONTINUES)
def test_continue_answers_its_phase_with_no_mutation(build: Callable[[], pb.ProcessingResponse],
                                                      phase: str) -> None:
    """The answer is set for exactly that phase, empty, so Envoy lets the phase through as is."""
    resp = build()
    assert resp.WhichOneof("response") == phase
    assert getattr(resp, phase).ByteSize() == 0
    assert not resp.HasField("mode_override") and not resp.HasField("dynamic_metadata")
