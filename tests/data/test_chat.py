import pytest

from dsv3.data.chat import (ASSISTANT, BOS, EOS, IGNORE, USER, apply_chat_template, build_chat_tokenizer,
                            decode_response, encode_chat, load_tokenizer, render)

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4=?"},
        {"role": "assistant", "content": "7"}, {"role": "user", "content": "2+2=?"},
        {"role": "assistant", "content": "\\boxed{4}"}]



@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small chat tokenizer trained on chat-shaped arithmetic text."""
    texts = [f"What is {a} + {b}?\nThe answer is \\boxed{{{a + b}}}." for a in range(30) for b in range(12)]
    d = tmp_path_factory.mktemp("chat_tok")
    build_chat_tokenizer(texts, vocab_size=512, out_dir=d)
    return load_tokenizer(d)


def test_template_string():
    s = render(MSGS[:3])
    assert s == f"{BOS}Be brief.{USER}3+4=?{ASSISTANT}7{EOS}"
    assert render(MSGS[:2], add_generation_prompt=True).endswith(ASSISTANT)


def test_tokens_round_trip_and_specials_atomic(tok):
    ids = apply_chat_template(tok, MSGS)
    assert tok.decode(ids) == render(MSGS)
    for t in (BOS, USER, ASSISTANT, EOS):
        assert ids.count(tok.convert_tokens_to_ids(t)) == {BOS: 1, USER: 2, ASSISTANT: 2, EOS: 2}[t]
    assert apply_chat_template(tok, MSGS, tokenize=False) == render(MSGS)


def test_loss_mask_covers_only_assistant_tokens(tok):
    ids, labels = encode_chat(tok, MSGS)
    assert len(ids) == len(labels)
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    eos = tok.convert_tokens_to_ids(EOS)
    # the trained tokens are exactly the two assistant contents, each closed by EOS
    want = tok.encode("7", add_special_tokens=False) + [eos] + tok.encode("\\boxed{4}", add_special_tokens=False) + [eos]
    assert kept == want
    assert all(lab == IGNORE or lab == i for i, lab in zip(ids, labels))
    # generation prompt: nothing trained
    ids2, labels2 = encode_chat(tok, MSGS[:2], add_generation_prompt=True)
    assert set(labels2) == {IGNORE} and ids2[-1] == tok.convert_tokens_to_ids(ASSISTANT)


def test_decode_response_stops_at_eos(tok):
    eos = tok.convert_tokens_to_ids(EOS)
    ids = tok.encode("12", add_special_tokens=False) + [eos] + tok.encode("junk", add_special_tokens=False)
    assert decode_response(tok, ids) == "12"
