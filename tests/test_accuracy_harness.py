"""benchmarks/accuracy.py refuses a tokenizer that is not Gemma 3's (fast; the harness run itself is in
tests/test_accuracy.py, marked slow)."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest


def load_accuracy():
    path = Path(__file__).parent.parent / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("accuracy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy"] = module
    spec.loader.exec_module(module)
    return module


class FakeTokenizer:
    """Gives `probe_ids` for the probe text and one id per character for anything else."""

    def __init__(self, probe, probe_ids):
        self.probe, self.probe_ids = probe, probe_ids

    def __call__(self, text, add_special_tokens=True):
        assert not add_special_tokens  # the harness adds BOS itself
        return SimpleNamespace(input_ids=self.probe_ids if text == self.probe else [ord(c) % 97 for c in text])


def test_text_tokens_checks_the_tokenizer():
    accuracy = load_accuracy()
    probe, expected = accuracy.TOKENIZER_PROBE
    ids = accuracy.text_tokens(FakeTokenizer(probe, expected))
    assert ids.numel() == len(accuracy.TEXT_PATH.read_text(encoding="utf-8"))
    word_pieces = [204930, 667, 1439, 1089, 1565, 25358]  # what transformers 5.17's GGUF tokenizer gives
    with pytest.raises(RuntimeError, match="not Gemma 3's"):
        accuracy.text_tokens(FakeTokenizer(probe, word_pieces))
