"""The API's streamer without a swarm: one delta per token, text decoded incrementally that joins up to the
whole decode, multi-byte characters never split, stop strings cut where they first occur in the whole text,
and each token's logprob sent with its text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from petals_like.api.engine import Choice, Sampling, _Recorder, _Streamer

TEXT = "naïve café — 東京 ok ünïcödé 🙂 end. stop here STOP x"


class _Engine:
    def __init__(self, tokenizer):
        self.tokenizer, self.eos = tokenizer, {tokenizer.eos_token_id}


def stream(tokenizer, ids: list[int], sampling: Sampling) -> tuple[list[tuple], Choice]:
    """Feed ids one token per put(), as generate() does; (the on_delta calls, the choice)."""
    choices = [Choice()]
    recorder = _Recorder()
    calls: list[tuple] = []
    streamer = _Streamer(_Engine(tokenizer), choices, sampling, recorder, lambda *call: calls.append(call))
    vocab = len(tokenizer)
    for token in ids:
        recorder.last = torch.log_softmax(torch.arange(vocab, dtype=torch.float32) % 7, dim=-1)[None]
        streamer.put(torch.tensor([token]))
        if choices[0].finish_reason is not None:
            break
    if choices[0].finish_reason is None:  # as CompletionEngine.run ends a choice that ran out of tokens
        choices[0].finish_reason = "length"
        streamer.flush(0, final=True)
    return calls, choices[0]


@pytest.fixture(scope="module")
def byte_tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """SentencePiece-style: words start with "▁", which a decode drops at its very start."""
    pieces = ["<unk>", "</s>"] + sorted(set("▁" + w for w in TEXT.split()) | set(TEXT.replace(" ", "▁")))
    core = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


def test_one_delta_per_token_and_the_deltas_join_to_the_whole_decode(byte_tokenizer, metaspace_tokenizer):
    for tokenizer in (byte_tokenizer, metaspace_tokenizer):
        ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert whole.strip() == TEXT
        calls, choice = stream(tokenizer, ids, Sampling())
        assert len(calls) == len(ids) + 1  # one per token, and the end
        assert "".join(call[1] for call in calls) == whole == choice.text
        assert all("\ufffd" not in call[1] for call in calls)  # no character is split between deltas
        assert [call[3] for call in calls] == [None] * len(ids) + ["length"]


def test_random_byte_streams_never_split_a_character(byte_tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        text = "".join(rng.choice(TEXT) for _ in range(30))
        ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
        calls, choice = stream(byte_tokenizer, ids, Sampling())
        assert "".join(call[1] for call in calls) == text
        assert all("\ufffd" not in call[1] for call in calls)
    # bytes that are no character at all come out as U+FFFD, once: nothing is lost or repeated
    ids = (
        byte_tokenizer("é", add_special_tokens=False)["input_ids"][:1]
        + byte_tokenizer("ab", add_special_tokens=False)["input_ids"]
    )
    calls, choice = stream(byte_tokenizer, ids * 2, Sampling())
    assert "".join(call[1] for call in calls) == byte_tokenizer.decode(ids * 2) == "\ufffdab\ufffdab"


@pytest.mark.parametrize("stops", [("STOP",), ("here", "東京"), ("é —",), ("never there",)])
def test_stop_strings_cut_at_their_first_occurrence(byte_tokenizer, stops):
    ids = byte_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    calls, choice = stream(byte_tokenizer, ids, Sampling(stop=stops))
    found = [TEXT.find(s) for s in stops if s in TEXT]
    expected = TEXT[: min(found)] if found else TEXT
    assert "".join(call[1] for call in calls) == choice.text == expected
    assert choice.finish_reason == ("stop" if found else "length")
    assert calls[-1][3] == choice.finish_reason and all(call[3] is None for call in calls[:-1])
    if found:  # generation stopped on the token that completed the stop string
        assert byte_tokenizer.decode(choice.token_ids).startswith(expected)
        assert len(choice.token_ids) < len(ids)


def test_each_logprob_goes_out_with_its_text(byte_tokenizer):
    ids = byte_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    calls, choice = stream(byte_tokenizer, ids, Sampling(logprobs=2, stop=("STOP",)))
    sent, logprobs = "", []
    for _, delta, new_logprobs, _ in calls:
        sent += delta
        logprobs += new_logprobs
        pieces = byte_tokenizer.decode([t.token_id for t in logprobs])
        assert pieces == sent  # what is out and the tokens whose logprobs are out cover the same text
    assert [t.token_id for t in logprobs] == ids[: len(logprobs)]
    assert all(len(t.top) == 2 for t in logprobs)
    assert choice.text == TEXT[: TEXT.find("STOP")]


def test_eos_ends_the_choice_without_its_text(byte_tokenizer):
    ids = byte_tokenizer("done", add_special_tokens=False)["input_ids"] + [byte_tokenizer.eos_token_id, 70, 71]
    calls, choice = stream(byte_tokenizer, ids, Sampling())
    assert choice.text == "done" and choice.finish_reason == "stop"
    assert choice.token_ids == ids[:5] and len(calls) == 5
