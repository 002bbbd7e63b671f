"""Shared test helpers: the parity metric, random weights, devices, and a tokenizer trained here."""
from __future__ import annotations

import io
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from prompts import ALL_PROMPTS  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")

# (device, dtype, relative-error tolerance). fp16 is checked on CUDA only: CPU fp16 kernels are slow
# and not what anyone runs. The tolerances are the project's targets, never loosened to pass.
PRECISIONS = [
    pytest.param("cpu", torch.float32, 1e-5, id="cpu-fp32"),
    pytest.param("cuda", torch.float32, 1e-5, id="cuda-fp32", marks=no_cuda),
    pytest.param("cuda", torch.float16, 5e-3, id="cuda-fp16", marks=no_cuda),
]


MEASURED: list[tuple[str, float]] = []  # (test id, relative error): printed after the run


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖, computed in float64 (and recorded for the summary at the end)."""
    ours, ref = ours.double().cpu(), ref.double().cpu()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert ref.norm() > 0, "the reference output is all zeros: the comparison would prove nothing"
    err = ((ours - ref).norm() / ref.norm()).item()
    MEASURED.append((os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], err))
    return err


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("parity: relative errors ‖ours − ref‖ / ‖ref‖ (largest per test)")
        worst: dict[str, float] = {}
        for test, err in MEASURED:
            worst[test] = max(err, worst.get(test, 0.0))
        for test, err in worst.items():
            terminalreporter.write_line(f"{err:9.2e}  {test}")


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter, so zero-initialised biases, unit norms and zeroed output convs
    (diffusers zero-inits some) all take part in the comparison."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def train_sentencepiece(path: str, sentences: list[str], vocab_size: int = 320) -> str:
    """Train a small sentencepiece *unigram* model (as XLM-R's is) and write it to `path`."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory) -> str:
    """A folder holding `sentencepiece.bpe.model` trained on prompts in all nine m9 languages."""
    d = tmp_path_factory.mktemp("spm")
    train_sentencepiece(str(d / "sentencepiece.bpe.model"), ALL_PROMPTS * 3)
    return str(d)
