"""TransformerLens 4's ``TransformerBridge`` around an in-memory Hugging Face model, offline.

``TransformerBridge.boot_transformers(path, hf_model=...)`` takes the model instance (same
weights, nothing copied) but still reads a config from ``path`` and a tokenizer unless one is
given: the config is saved to a temporary folder and a word-level tokenizer over the model's
vocabulary stands in (the benchmarks feed token ids, never text).

On a multimodal model the boot also tries ``AutoProcessor.from_pretrained(path)``; when that
fails (here it always does: the folder holds no processor) TransformerLens 4.3 runs
``pip install torchvision`` into the running interpreter's environment. A benchmark must not
change the environment it measures, so the boot runs with process creation refused: the
processor step then fails quietly, as it does for any missing processor.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def no_subprocesses() -> Iterator[None]:
    """Refuse to start any process (``subprocess.Popen`` raises) inside the block."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"benchmark refuses to start a process: {args[:1]}")

    original = subprocess.Popen
    subprocess.Popen = refuse  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        subprocess.Popen = original  # type: ignore[misc]


def word_tokenizer(vocab_size: int):
    """A tokenizer whose ids are ``t0 .. t{vocab_size - 1}``: enough for id inputs."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")),
                                   unk_token="t0", pad_token="t0")


def boot_bridge(hf_model: torch.nn.Module, dtype: torch.dtype,
                device: str) -> tuple[object | None, str]:
    """``(bridge, "")`` wrapping ``hf_model`` itself, or ``(None, why)`` with the exception text
    when TransformerLens has no bridge or the bridge cannot wrap this model."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as err:
        return None, f"TransformerBridge unavailable ({err}): pip install 'transformer_lens>=4'"
    config = hf_model.config
    text_config = getattr(config, "text_config", config)
    folder = tempfile.mkdtemp(prefix="bridge-config-")
    config.architectures = [type(hf_model).__name__]
    config.save_pretrained(folder)
    try:
        with no_subprocesses():
            bridge = TransformerBridge.boot_transformers(
                folder, hf_model=hf_model, tokenizer=word_tokenizer(text_config.vocab_size),
                dtype=dtype, device=device)
    except Exception as err:  # the bridge is a peer to compare with, not a requirement
        return None, (f"TransformerBridge could not wrap {type(hf_model).__name__}: "
                      f"{type(err).__name__}: {err}")
    return bridge, ""
