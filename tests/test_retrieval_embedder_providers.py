"""An ONNX Runtime session that does not run on the provider asked for first (CUDA falling back to the CPU) is
logged as a warning naming both."""

from __future__ import annotations

import logging
import warnings

import onnxruntime
import pytest

import retrieval.embedder as embedder_module
from benchmarks.fixtures.tiny_onnx import make_tiny_model
from retrieval.embedder import OnnxEmbedder

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.fixture
def model(tmp_path):
    return make_tiny_model(tmp_path / "model.onnx")


def _fallbacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "as requested" in r.getMessage()]


@pytest.fixture
def sessions_report(monkeypatch):
    """``sessions_report(providers)``: real sessions (on the CPU) that say they run on ``providers``."""

    def pretend(providers: list[str]) -> None:
        class Reporting(onnxruntime.InferenceSession):
            def __init__(self, path, options=None, providers=None, **kwargs) -> None:
                super().__init__(path, options, providers=[CPU], **kwargs)

            def get_providers(self) -> list[str]:
                return list(pretended)

        pretended = providers
        monkeypatch.setattr(embedder_module.onnxruntime, "InferenceSession", Reporting)

    return pretend


def test_a_session_that_fell_back_from_cuda_is_logged(model, caplog, sessions_report) -> None:
    sessions_report([CPU])
    with caplog.at_level(logging.WARNING, logger="retrieval.embedder"):
        OnnxEmbedder(model, providers=[(CUDA, {"device_id": 0}), CPU])
    (message,) = _fallbacks(caplog)
    assert f"runs model.onnx on {CPU}, not on {CUDA} as requested" in message
    assert f"providers requested: {CUDA}, {CPU}; the session has: {CPU}" in message


@pytest.mark.parametrize(("requested", "running"), [([CUDA, CPU], [CUDA, CPU]), ([CPU], [CPU])])
def test_a_session_on_the_provider_asked_for_is_not_logged(model, caplog, sessions_report, requested, running) -> None:
    sessions_report(running)
    with caplog.at_level(logging.WARNING, logger="retrieval.embedder"):
        OnnxEmbedder(model, providers=requested)
    assert _fallbacks(caplog) == []


def test_this_machine_s_onnx_runtime_falls_back_for_real_and_is_logged(model, caplog) -> None:
    """No fake session: a CPU build of ONNX Runtime asked for CUDA runs on the CPU."""
    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime build has the CUDA provider")
    with caplog.at_level(logging.WARNING, logger="retrieval.embedder"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ONNX Runtime's own UserWarning that CUDA is not available
        embedder = OnnxEmbedder(model, providers=[CUDA, CPU])
    assert embedder.session.get_providers() == [CPU]
    assert len(_fallbacks(caplog)) == 1
