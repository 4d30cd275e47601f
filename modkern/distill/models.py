"""The models of a distillation: loaded from local folders, checked to share one tokenizer,
and read as (last hidden states, lm_head) so the loss never builds their [tokens, V] logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModkernError


class ModelError(ModkernError, ValueError):
    """A model folder that cannot be loaded, or models that cannot be distilled together."""


# Config entries that make logits differ from hidden @ lm_head.T (+ bias): those models'
# logits cannot be fused this way.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale",
                     "logits_scaling")


@dataclass
class Head:
    """A causal LM read as its decoder (last hidden states) and its output projection."""

    name: str
    model: torch.nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.model.get_output_embeddings(), "bias", None)

    @property
    def vocab_in(self) -> int:
        """How many token ids the model can embed."""
        return self.model.get_input_embeddings().weight.shape[0]

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last hidden states [B, L, H] (after the final norm), no logits."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False)
        return out.last_hidden_state


def check_head(name: str, model) -> Head:
    """`model` as a Head; ModelError if its logits are not hidden @ lm_head.T (+ bias)."""
    config = model.config
    for key in _LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise ModelError(f"{name}: config sets {key} = {value!r}: its logits are not "
                             "hidden @ lm_head.T, which the fused loss needs")
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise ModelError(f"{name}: {type(model).__name__} has no linear output head "
                         "(get_output_embeddings()); expected a causal LM")
    if model.base_model is model:
        raise ModelError(f"{name}: {type(model).__name__} exposes no decoder "
                         "(base_model); expected a transformers causal LM")
    return Head(name, model)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars inside (one per tiny load or save would drown the
    command's own output); the previous setting is restored."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def check_folder(folder: Path, name: str) -> None:
    """ModelError unless `folder` looks like a local Hugging Face model folder."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{name} {folder}: no config.json; expected a local Hugging Face "
                         "model folder")


def load_model(folder: str | Path, name: str, dtype: torch.dtype, device: str):
    """A causal LM from a local folder (nothing downloaded); ModelError naming the folder."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    check_folder(folder, name)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                     dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{name} {folder}: cannot load it as a causal LM: {first}") from None
    try:
        return model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise ModelError(f"{name}: cannot move to device {device!r}: "
                         f"{str(err).splitlines()[0]}") from None


def load_tokenizer(folder: str | Path, name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{name} {folder}: no usable tokenizer ({first}); every model "
                         "must come with the tokenizer it shares with the others") from None


def check_same_tokenizer(student_tok, other_tok, name: str) -> None:
    """ModelError unless both map every token to the same id and agree on <eos>."""
    a, b = student_tok.get_vocab(), other_tok.get_vocab()
    if a != b:
        only = sorted(set(a) ^ set(b))[:3]
        moved = sorted(t for t in set(a) & set(b) if a[t] != b[t])[:3]
        detail = f"tokens in one only: {only}" if only else f"tokens with other ids: {moved}"
        raise ModelError(f"{name}: its tokenizer differs from the student's ({len(a)} vs "
                         f"{len(b)} tokens; {detail}); distillation needs one tokenizer")
    if student_tok.eos_token_id != other_tok.eos_token_id:
        raise ModelError(f"{name}: end-of-sequence token id {other_tok.eos_token_id} differs "
                         f"from the student's {student_tok.eos_token_id}")
