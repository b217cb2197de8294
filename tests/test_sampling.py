"""One sampling definition for chat, eval and serve (chattune/sampling.py): the rules that turn a request's options
and the model's generation_config into settings, `generate`'s arguments and the batched engine's processors agree,
and stop strings are found where a new token completes them."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from chattune.sampling import SamplingSettings, StopStrings, choose_token, sampling_settings


def test_top_k_comes_only_from_a_generation_config_that_sets_it():
    # transformers' built-in top_k default (50) is no one's choice: chat used it, serve forced 0; now both use none
    assert sampling_settings(GenerationConfig(), 0.7, 0.9).top_k == 0
    assert sampling_settings(GenerationConfig(top_k=20), 0.7, 0.9).top_k == 20
    assert sampling_settings(None, 0.7, 0.9).top_k == 0


def test_repetition_penalty_and_greedy():
    s = sampling_settings(GenerationConfig(repetition_penalty=1.1, top_k=5), 0.0, 0.5)
    assert s.greedy and s.repetition_penalty == 1.1
    assert s.generate_kwargs() == {"repetition_penalty": 1.1, "do_sample": False, "temperature": None,
                                   "top_p": None, "top_k": None, "min_p": None}
    hot = sampling_settings(GenerationConfig(top_k=5), 0.8, 0.9, seed=3)
    assert hot.generate_kwargs() == {"repetition_penalty": 1.0, "do_sample": True, "temperature": 0.8, "top_p": 0.9,
                                     "top_k": 5, "min_p": None}
    assert sampling_settings(GenerationConfig(min_p=0.1), 0.8).min_p == 0.1  # the file's min_p, as its top_k
    assert sampling_settings(GenerationConfig(min_p=0.1), 0.8, min_p=0.05).min_p == 0.05  # a request's wins
    assert hot.seed == 3


def test_the_engines_processors_are_generates_own():
    """The batched engine's processors give the scores transformers' generate computes for the same settings."""
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

    model = LlamaForCausalLM(LlamaConfig(vocab_size=6, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    settings = SamplingSettings(temperature=0.7, top_p=0.8, top_k=3, repetition_penalty=1.3, min_p=0.05)
    ids = torch.tensor([[1, 4]])
    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0]])
    ours = settings.processors()(ids, scores.clone())
    config = GenerationConfig(**settings.generate_kwargs())
    theirs = model._get_logits_processor(config, input_ids_seq_length=2, encoder_input_ids=ids,
                                         logits_processor=LogitsProcessorList(), device="cpu")(ids, scores.clone())
    torch.testing.assert_close(ours, theirs)


def test_top_p_zero_and_tiny_temperatures_never_empty_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    assert choose_token(SamplingSettings(1.0, 0.0), SamplingSettings(1.0, 0.0).processors(), logits, [1]) == 0
    tiny = SamplingSettings(1e-39, 1.0)
    assert choose_token(tiny, tiny.processors(), logits, [1]) == 0


def test_stop_strings_are_found_where_a_token_completes_them():
    stops = StopStrings(["</answer>", "\n\n", ""])
    assert stops.stops == ["</answer>", "\n\n"] and stops.longest == 9
    assert stops.cut("done</answer> more") == ("done", True)
    assert stops.cut("a\n\nb</answer>") == ("a", True)
    assert stops.cut("nothing here") == ("nothing here", False)
    text = "abc</ans" + "wer>"
    assert stops.find(text, start=len("abc</ans")) == 3  # begins before the new text, ends in it
    assert not StopStrings([]) and StopStrings(None).cut("x") == ("x", False)


def test_presence_and_frequency_penalties_count_the_answer_only():
    """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), over the answer's tokens (after the
    prompt), on the batched path and on generate's alike (the same processor)."""
    settings = SamplingSettings(presence_penalty=0.5, frequency_penalty=0.25)
    ids = torch.tensor([[3, 3, 1, 1, 1, 2]])  # prompt [3, 3], answer [1, 1, 1, 2]
    scores = torch.zeros(1, 5)
    out = settings.processors(prompt_length=2)(ids, scores.clone())
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0, 0.0]]  # token 3 is only in the prompt
    assert settings.answer_processors(2)(ids, scores.clone()).tolist() == out.tolist()
    assert settings.needs_history and not SamplingSettings().needs_history
    # greedy with a presence penalty avoids repeating the answer's last token
    logits = torch.tensor([2.0, 1.9, 0.0])
    assert choose_token(settings, settings.processors(prompt_length=1), logits, [2, 0]) == 1
