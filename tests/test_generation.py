"""Mixture decoding (modkern.decoding.generation) on tiny random Qwen2 / Llama models built locally.

The references are the models' own `generate` (alpha = 1 and 0 must reproduce it token for
token) and full-sequence forwards without any cache, mixed by the float64 specification."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LogitsProcessorList  # noqa: E402

from modkern import AlphaError, ShapeMismatchError  # noqa: E402
from modkern.decoding.generation import MixtureOfDistributions, generate  # noqa: E402
from modkern.ops.mix_reference import mix_logits_reference  # noqa: E402
from modkern.demo.toy import char_tokenizer, tiny_causal_lm  # noqa: E402

PROMPTS = ["12+3=", "a", "hello abc", "7"]
NEW = 6


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer("0123456789+=abcdefghlo ")


@pytest.fixture(scope="module")
def models(tok):
    v = len(tok)
    return tiny_causal_lm(v, seed=1), tiny_causal_lm(v, arch="llama", seed=2)


def encode(tok, prompts):
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side


def plain_greedy(model, tok, prompts, **kw):
    enc = encode(tok, prompts)
    out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         eos_token_id=1, **kw)
    return out[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("alpha,which", [(1.0, 0), (0.0, 1)])
def test_end_weights_reproduce_each_model_greedy(models, tok, alpha, which, batched):
    groups = [PROMPTS] if batched else [[p] for p in PROMPTS]
    for prompts in groups:
        got = generate(*models, tok, prompts, alpha, max_new_tokens=NEW, return_tensors=True)
        assert torch.equal(got, plain_greedy(models[which], tok, prompts))


def test_end_weights_through_the_processor_in_model_generate(models, tok):
    m1, m2 = models
    enc = encode(tok, PROMPTS)
    proc = MixtureOfDistributions(m2, 0.0, attention_mask=enc["attention_mask"])
    out = m1.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                      eos_token_id=1, logits_processor=LogitsProcessorList([proc]))
    assert torch.equal(out[:, enc["input_ids"].shape[1]:], plain_greedy(m2, tok, PROMPTS))


def test_batch_equals_one_by_one(models, tok):
    batch = generate(*models, tok, PROMPTS, 0.4, max_new_tokens=NEW, return_tensors=True)
    for i, prompt in enumerate(PROMPTS):
        one = generate(*models, tok, prompt, 0.4, max_new_tokens=NEW, return_tensors=True)[0]
        assert torch.equal(batch[i, :len(one)], one)
        assert (batch[i, len(one):] == tok.pad_token_id).all()  # finished early: padded
    texts = generate(*models, tok, PROMPTS, 0.4, max_new_tokens=NEW)
    assert texts == [generate(*models, tok, p, 0.4, max_new_tokens=NEW)[0] for p in PROMPTS]


def full_forward_logits(model, ids, mask):
    """Next-token logits of the last position, from one forward over the whole sequence."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos,
                     use_cache=False).logits[:, -1].double()


def test_scores_are_the_mixture_of_uncached_forwards(models, tok):
    """Every step's processed scores equal the specification applied to logits that both
    models compute from scratch (no KV cache) over the left-padded sequence so far."""
    m1, m2 = models
    alpha = 0.3
    enc = encode(tok, PROMPTS)
    proc = MixtureOfDistributions(m2, alpha, attention_mask=enc["attention_mask"])
    out = m1.generate(**enc, max_new_tokens=NEW, do_sample=False,
                      pad_token_id=0, eos_token_id=1, output_scores=True,
                      return_dict_in_generate=True,
                      logits_processor=LogitsProcessorList([proc]))
    length = enc["input_ids"].shape[1]
    for step, scores in enumerate(out.scores):
        ids = out.sequences[:, :length + step]
        mask = torch.cat([enc["attention_mask"],
                          torch.ones(len(PROMPTS), step, dtype=torch.long)], dim=1)
        expect = mix_logits_reference(full_forward_logits(m1, ids, mask),
                                      full_forward_logits(m2, ids, mask), alpha)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores.double(), expect, atol=2e-5, rtol=1e-5)
        assert torch.equal(out.sequences[:, length + step], expect.argmax(-1))


def test_other_model_runs_once_per_generated_token(models, tok):
    m1, m2 = models
    calls = []
    hook = m2.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        enc = encode(tok, PROMPTS)
        new = 9
        generate(m1, m2, tok, PROMPTS, 0.5, max_new_tokens=new, min_new_tokens=new)
    finally:
        hook.remove()
    # one forward per generated token: the prompt once, then only the token just appended
    assert len(calls) == new
    assert calls[0] == enc["input_ids"].shape
    assert all(shape == (len(PROMPTS), 1) for shape in calls[1:])


def test_processor_serves_a_second_generate_call(models, tok):
    m1, m2 = models
    proc = MixtureOfDistributions(m2, 0.0, pad_token_id=tok.pad_token_id)
    for prompts in (PROMPTS, ["bb", "3+4="]):
        enc = encode(tok, prompts)
        proc.reset(enc["attention_mask"])
        out = m1.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          eos_token_id=1, logits_processor=LogitsProcessorList([proc]))
        assert torch.equal(out[:, enc["input_ids"].shape[1]:], plain_greedy(m2, tok, prompts))


def test_mask_inferred_from_pad_token(models, tok):
    m1, m2 = models
    enc = encode(tok, PROMPTS)
    proc = MixtureOfDistributions(m2, 0.0, pad_token_id=tok.pad_token_id)
    out = m1.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                      eos_token_id=1, logits_processor=LogitsProcessorList([proc]))
    assert torch.equal(out[:, enc["input_ids"].shape[1]:], plain_greedy(m2, tok, PROMPTS))


def test_vocabulary_widths_differ_common_prefix(tok):
    v = len(tok)
    wide = tiny_causal_lm(v + 7, seed=3)    # model 1: 7 extra (padded head) columns
    narrow = tiny_causal_lm(v, arch="llama", seed=4)
    enc = encode(tok, PROMPTS)
    proc = MixtureOfDistributions(narrow, 0.6, attention_mask=enc["attention_mask"])
    out = wide.generate(**enc, max_new_tokens=3, do_sample=False,
                        pad_token_id=0, eos_token_id=1, output_scores=True,
                        return_dict_in_generate=True,
                        logits_processor=LogitsProcessorList([proc]))
    first = out.scores[0]
    assert first.shape == (len(PROMPTS), v + 7)
    assert torch.isneginf(first[:, v:]).all()
    ids, mask = enc["input_ids"], enc["attention_mask"]
    expect = mix_logits_reference(full_forward_logits(wide, ids, mask)[:, :v],
                                  full_forward_logits(narrow, ids, mask), 0.6)
    torch.testing.assert_close(first[:, :v].double(), expect, atol=2e-5, rtol=1e-5)
    # and the other way round: model 1 narrower than model 2
    texts = generate(narrow, wide, tok, PROMPTS, 0.5, max_new_tokens=3)
    assert len(texts) == len(PROMPTS)


def test_sampling_seeded_and_alpha_one_matches_model_sampling(models, tok):
    m1, m2 = models
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=0.8, top_p=0.9,
              return_tensors=True)
    a = generate(m1, m2, tok, PROMPTS, 0.5, seed=7, **kw)
    b = generate(m1, m2, tok, PROMPTS, 0.5, seed=7, **kw)
    assert torch.equal(a, b)
    # alpha = 1: the same draws as model 1's own sampler from the same seed
    got = generate(m1, m2, tok, PROMPTS, 1.0, seed=11, **kw)
    enc = encode(tok, PROMPTS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        ref = m1.generate(**enc, max_new_tokens=NEW, do_sample=True, temperature=0.8,
                          top_p=0.9, top_k=0, pad_token_id=0, eos_token_id=1)
    assert torch.equal(got, ref[:, enc["input_ids"].shape[1]:])


def test_bad_input(models, tok):
    m1, m2 = models
    with pytest.raises(AlphaError):
        MixtureOfDistributions(m2, 1.5)
    with pytest.raises(AlphaError):
        generate(m1, m2, tok, "1+1=", -0.1)
    with pytest.raises(ValueError, match="beam"):
        generate(m1, m2, tok, "1+1=", 0.5, num_beams=2)
    enc = encode(tok, PROMPTS)
    proc = MixtureOfDistributions(m2, 0.5, attention_mask=enc["attention_mask"][:, :2])
    with pytest.raises(ShapeMismatchError, match="attention mask"):
        m1.generate(**enc, max_new_tokens=2, pad_token_id=0,
                    logits_processor=LogitsProcessorList([proc]))


def test_import_modkern_stays_light():
    code = ("import sys, modkern; assert 'transformers' not in sys.modules; "
            "assert callable(modkern.generate); "
            "assert modkern.MixtureOfDistributions.__module__ == 'modkern.decoding.generation'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_generate(models, tok, tmp_path, capsys):
    from modkern.cli import main

    m1, m2 = models
    for name, model in (("a", m1), ("b", m2)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    expect = generate(m1, m2, tok, ["12+3=", "ab"], 0.5, max_new_tokens=5)
    argv = ["generate", "--model", str(tmp_path / "a"), "--other", str(tmp_path / "b"),
            "--alpha", "0.5", "--prompt", "12+3=", "--prompt", "ab", "--max-new-tokens", "5"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "12+3=" + expect[0] in lines and "ab" + expect[1] in lines
    assert main(argv[:5] + ["--alpha", "2", "--prompt", "x"]) == 2
    assert "alpha" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--other",
                 str(tmp_path / "b"), "--prompt", "x"]) == 2


def test_other_model_in_bfloat16(tok):
    """Model 2 in another dtype: its logits are mixed in float32; alpha = 0 still reproduces
    its own greedy decoding."""
    v = len(tok)
    m1 = tiny_causal_lm(v, seed=1)
    m2 = tiny_causal_lm(v, arch="llama", seed=2).to(torch.bfloat16)
    got = generate(m1, m2, tok, PROMPTS, 0.0, max_new_tokens=NEW, return_tensors=True)
    assert torch.equal(got, plain_greedy(m2, tok, PROMPTS))


def test_generate_constraints_survive_the_mixture(models, tok):
    """generate's own processors forbid tokens with -inf (here bad_words_ids); the mixture
    runs after them and must not give those tokens back, even at alpha 0 (model 2 alone)."""
    m1, m2 = models
    first = plain_greedy(m2, tok, PROMPTS[:1])[0, 0].item()  # model 2's first greedy token
    got = generate(m1, m2, tok, PROMPTS[:1], 0.0, max_new_tokens=NEW, return_tensors=True,
                   bad_words_ids=[[first]])
    assert first not in got[0].tolist()
