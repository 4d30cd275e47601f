"""Decoding with a mixture of two models (docs/design.md 1.2) inside transformers' `generate`.

    proc = MixtureOfDistributions(model2, alpha=0.5, attention_mask=enc.attention_mask)
    out = model1.generate(**enc, logits_processor=LogitsProcessorList([proc]))

or, in one call, `generate(model1, model2, tokenizer, prompts, alpha=0.5)`.

Model 1 is the model `generate` runs; the processor runs model 2 beside it on the same
tokens, with its own KV cache, one forward per generated token after the prompt, and
replaces the scores by log(alpha*p1 + (1-alpha)*p2). Tokens of one model's vocabulary
beyond the other's width get probability zero (the common prefix of both vocabularies).
This module imports transformers: `modkern/__init__.py` loads it only on first use.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..errors import ShapeMismatchError
from ..ops.mix import mix_logits
from ..checks import check_alpha

__all__ = ["MixtureOfDistributions", "generate"]


def _cache_argument(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by: `cache` (transformers >= 5.x)
    or `past_key_values` (earlier releases)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class MixtureOfDistributions(LogitsProcessor):
    """A transformers `LogitsProcessor` that decodes from the mixture of the running model
    (model 1) and `other_model` (model 2):

        scores <- log(alpha * softmax(scores) + (1 - alpha) * softmax(logits of model 2))

    alpha = 1 keeps model 1's distribution (model 2 is not run), alpha = 0 gives model 2's.
    The returned scores are float32 log-probabilities over model 1's vocabulary width;
    columns past the narrower of the two vocabularies are -inf (never chosen), and so is
    every token generate's own processors forbade (bad_words_ids, min_new_tokens, ...).
    Put it in `logits_processor=` of `model.generate` with greedy search or sampling
    (temperature, top-k, top-p act on the mixture); beam search is not supported (the
    second cache is not reordered).

    Model 2 keeps its own KV cache: the first call (the prompt) runs it over the prompt, every
    later call feeds it the one token `generate` appended. A call whose tokens do not extend
    the previous call's by one token starts over, so one processor may serve several
    `generate` calls; call `reset(attention_mask)` to give it the next batch's padding.

    attention_mask: the prompts' mask [B, L] (left padding), as passed to `generate`.
        Without it, positions equal to `pad_token_id` are masked; without both, nothing is.
    backend: "auto", "torch" or "triton", for the mixture op.
    """

    supports_continuous_batching = False

    def __init__(self, other_model: torch.nn.Module, alpha: float, *,
                 attention_mask: torch.Tensor | None = None,
                 pad_token_id: int | None = None, backend: str = "auto") -> None:
        self.other_model = other_model
        self.alpha = check_alpha(alpha)
        self.pad_token_id = pad_token_id
        self.backend = backend
        self._cache_kw = _cache_argument(other_model)
        self._keeps_last = "logits_to_keep" in inspect.signature(other_model.forward).parameters
        self.reset(attention_mask)

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Forget the running sequences; the next call starts from a prompt whose padding
        mask is `attention_mask` (or is inferred as described in the class docstring)."""
        self.attention_mask = attention_mask
        self._tokens: torch.Tensor | None = None  # what model 2 has seen, [B, T]
        self._mask: torch.Tensor | None = None    # its attention mask, [B, T]
        self._next_position: torch.Tensor | None = None  # [B, 1]
        self._cache: Any = None

    def _device(self) -> torch.device:
        return next(self.other_model.parameters()).device

    def _extends_previous(self, input_ids: torch.Tensor) -> bool:
        seen = self._tokens
        return (seen is not None and input_ids.shape[0] == seen.shape[0]
                and input_ids.shape[1] == seen.shape[1] + 1
                and torch.equal(input_ids[:, :-1], seen))

    def _prompt_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None:
            if self.pad_token_id is None:
                return torch.ones_like(input_ids)
            return (input_ids != self.pad_token_id).long()
        mask = mask.to(input_ids.device).long()
        rows, length = input_ids.shape
        if mask.shape[1] != length or rows % mask.shape[0] != 0:
            raise ShapeMismatchError(
                f"MixtureOfDistributions: the attention mask given has shape "
                f"{tuple(mask.shape)} but generate's prompt ids have shape {(rows, length)}; "
                "pass the mask of the prompts being decoded (reset(attention_mask))")
        # num_return_sequences > 1 repeats each prompt in place, as generate does
        return mask.repeat_interleave(rows // mask.shape[0], dim=0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0:  # model 1 alone: model 2 need not run
            return torch.log_softmax(scores.float(), dim=-1)
        with torch.no_grad():
            logits2 = self._step(input_ids)
        mixed = mix_logits(scores, logits2.to(scores.device), self.alpha,
                           backend=self.backend, vocab="common")
        if mixed.shape[-1] < scores.shape[-1]:  # model 1's extra columns: outside the mixture
            pad = mixed.new_full((mixed.shape[0], scores.shape[-1] - mixed.shape[-1]),
                                 float("-inf"))
            mixed = torch.cat([mixed, pad], dim=-1)
        # generate's own processors run first and forbid tokens with -inf (bad_words_ids,
        # min_new_tokens, suppressed tokens): the mixture must not give them back
        return mixed.masked_fill_(torch.isneginf(scores), float("-inf"))

    def _step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run model 2 on what is new in `input_ids` and return its next-token logits [B, V2]."""
        device = self._device()
        ids = input_ids.to(device)
        if self._extends_previous(input_ids):
            new = ids[:, -1:]
            mask = torch.cat([self._mask, torch.ones_like(new)], dim=1)
            positions = self._next_position
            cache = self._cache
        else:  # a new prompt: prefill
            new = ids
            mask = self._prompt_mask(ids)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            cache = None
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._keeps_last:
            kwargs["logits_to_keep"] = 1
        out = self.other_model(input_ids=new, attention_mask=mask, position_ids=positions,
                               **kwargs)
        self._cache = _returned_cache(out)
        self._tokens = input_ids.clone()
        self._mask = mask
        self._next_position = positions[:, -1:] + 1
        return out.logits[:, -1, :].float()


def generate(model1: torch.nn.Module, model2: torch.nn.Module, tokenizer: Any,
             prompts: str | Sequence[str], alpha: float, *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, backend: str = "auto",
             skip_special_tokens: bool = True, return_tensors: bool = False,
             **generate_kwargs: Any) -> list[str] | torch.Tensor:
    """Decode `prompts` from the mixture alpha*p1 + (1-alpha)*p2 of two causal LMs that
    share `tokenizer` (their vocabularies' common prefix is used).

    Greedy by default; `do_sample=True` samples with `temperature`, `top_p` and `top_k`
    (0 = off) applied to the mixture, reproducibly when `seed` is given (the global RNG
    state is restored afterwards). Prompts are batched with left padding.

    Returns the decoded continuations (one string per prompt, prompt excluded), or with
    `return_tensors=True` the new token ids [B, T] (padded after an end-of-sequence token).
    Extra keyword arguments go to `model1.generate` (beam search is refused).
    """
    alpha = check_alpha(alpha)
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError("modkern.generate: beam search is not supported (num_beams must be 1)")
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    saved = tokenizer.padding_side, tokenizer.pad_token
    try:  # left padding, and eos as pad when the tokenizer has none; both restored after
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("modkern.generate: the tokenizer has neither a pad nor an "
                                 "end-of-sequence token to pad prompts with")
            tokenizer.pad_token = tokenizer.eos_token
        pad_id = tokenizer.pad_token_id
        enc = tokenizer(batch, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved
    device = next(model1.parameters()).device
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc["attention_mask"].to(device)

    mixture = MixtureOfDistributions(model2, alpha, attention_mask=attention_mask,
                                     backend=backend)
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   pad_token_id=pad_id, num_beams=1)
    if tokenizer.eos_token_id is not None:
        options["eos_token_id"] = tokenizer.eos_token_id
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    options.update(generate_kwargs)

    rng = contextlib.nullcontext()
    if seed is not None:
        cuda = [device] if device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=cuda)
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        out = model1.generate(input_ids=input_ids, attention_mask=attention_mask,
                              logits_processor=LogitsProcessorList([mixture]), **options)
    new_tokens = out[:, input_ids.shape[1]:]
    if return_tensors:
        return new_tokens
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=skip_special_tokens)
