"""model/engine.py and model/text_stream.py: the KV-cache engine equals a plain forward pass, a row's
greedy tokens do not depend on its neighbours, sampling does what OpenAI's parameters say, and
streamed text is exact (whole characters, stop strings never shown)."""

import pytest
import torch

from model.engine import Engine, SamplingParams, generate, generate_batch
from model.gpt import GPT, GPTConfig
from model.text_stream import TextStream
from model.tokenizer import EOT, VOCAB_SIZE, decode, encode

GREEDY = SamplingParams(max_tokens=24, temperature=0)
PROMPTS = [encode(t) for t in ("Hi", "The quick brown fox jumps over the lazy dog and", "Once upon a time,",
                              "A somewhat longer prompt, so that the rows have different lengths: one, two, three")]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=96, n_layer=2, n_head=4, n_embd=64)).eval()


def reference(model: GPT, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy tokens from full forward passes without a cache, penalties applied as OpenAI documents them."""
    tokens, out = list(prompt), []
    counts = torch.zeros(VOCAB_SIZE)
    with torch.no_grad():
        for _ in range(params.max_tokens):
            logits = model(torch.tensor([tokens]))[0][0, -1, :VOCAB_SIZE]
            logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
            token = int(logits.argmax())
            if token == EOT:
                break
            counts[token] += 1
            out.append(token)
            tokens.append(token)
            if len(tokens) == model.config.block_size:
                break
    return out


def finish(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY):
    """Start a request in an idle engine and run it to the end."""
    seq = engine.start(prompt, params)
    while seq.finish_reason is None:
        if engine.prefill_step() is None and seq.prefilled:
            engine.decode_step()
    return seq


def run_alone(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return finish(engine, prompt, params).output


def run_all(engine: Engine, seqs_by_step: dict[int, list], until_done) -> None:
    """Drive the engine like the server: each step admits what is due, prefills, then decodes the batch."""
    step = 0
    while not until_done():
        for prompt, params, out in seqs_by_step.get(step, []):
            while not engine.has_room():
                engine.prefill_step()
            out.append(engine.start(prompt, params))
            while engine.prefill_step() is None and engine.prefilling is not None:
                pass
        engine.decode_step()
        step += 1


def test_cached_decoding_equals_full_forward_passes(model):
    for chunk in (256, 5):  # whole prompts, and prompts prefilled 5 tokens at a time
        engine = Engine(model, max_rows=2, prefill_chunk=chunk)
        for prompt in PROMPTS:
            assert run_alone(engine, prompt) == reference(model, prompt, GREEDY)
            assert engine.rows == [] and engine.prefilling is None  # finished rows leave


def test_penalties_match_openais_formula(model):
    params = SamplingParams(max_tokens=24, temperature=0, frequency_penalty=0.7, presence_penalty=1.3)
    for prompt in PROMPTS:
        got = run_alone(Engine(model, max_rows=1), prompt, params)
        assert got == reference(model, prompt, params)
    assert got != reference(model, prompt, GREEDY)  # the penalties changed something


def test_greedy_rows_do_not_depend_on_their_neighbours(model):
    alone = [run_alone(Engine(model, max_rows=1), p) for p in PROMPTS]
    # all four together from the start
    engine, seqs = Engine(model, max_rows=4), []
    run_all(engine, {0: [(p, GREEDY, seqs) for p in PROMPTS]}, lambda: seqs and all(s.finish_reason for s in seqs))
    assert [s.output for s in seqs] == alone
    # joining a running batch at different steps, next to neighbours that finish early (swap-remove)
    engine, seqs = Engine(model, max_rows=4), []
    short = SamplingParams(max_tokens=3, temperature=0)
    schedule = {0: [(PROMPTS[3], GREEDY, seqs), (PROMPTS[0], short, seqs)], 2: [(PROMPTS[1], GREEDY, seqs)],
                5: [(PROMPTS[2], short, seqs), (PROMPTS[0], GREEDY, seqs)]}
    run_all(engine, schedule, lambda: len(seqs) == 5 and all(s.finish_reason for s in seqs))
    assert seqs[0].output == alone[3] and seqs[2].output == alone[1] and seqs[4].output == alone[0]
    assert seqs[1].output == alone[0][:3] and seqs[3].output == alone[2][:3]


def test_a_cancelled_row_leaves_the_others_undisturbed(model):
    alone = [run_alone(Engine(model, max_rows=1), p) for p in PROMPTS]
    engine, seqs = Engine(model, max_rows=4), []
    run_all(engine, {0: [(p, GREEDY, seqs) for p in PROMPTS]}, lambda: len(seqs) == 4 and len(seqs[0].output) >= 4)
    engine.release(seqs[1])  # the client went away
    while any(s.finish_reason is None for s in (seqs[0], seqs[2], seqs[3])):
        engine.decode_step()
    assert [seqs[0].output, seqs[2].output, seqs[3].output] == [alone[0], alone[2], alone[3]]
    assert len(seqs[1].output) < len(alone[1])


def test_finish_reasons(model):
    engine = Engine(model, max_rows=2)
    seq = finish(engine, PROMPTS[1], SamplingParams(max_tokens=5, temperature=0))
    assert (seq.finish_reason, len(seq.output), seq.sampled) == ("length", 5, 5)
    # a prompt that nearly fills the context stops when the cache is full
    long_prompt = (PROMPTS[3] * 10)[:90]
    seq = finish(engine, long_prompt, GREEDY)
    assert seq.finish_reason == "length" and len(seq.prompt) + len(seq.output) == 96 + 1
    # a model that always says <|endoftext|>: nothing is generated, one token is counted
    eot_model = GPT(GPTConfig(block_size=96, n_layer=1, n_head=4, n_embd=64)).eval()
    with torch.no_grad():
        eot_model.transformer.ln_f.weight.zero_()
        eot_model.transformer.ln_f.bias.zero_()
        eot_model.transformer.ln_f.bias[0] = 1.0
        eot_model.lm_head.weight[EOT, 0] = 100.0
    engine = Engine(eot_model, max_rows=1)
    seq = engine.start(PROMPTS[0], SamplingParams(temperature=0.8))
    engine.prefill_step()
    assert (seq.finish_reason, seq.output, seq.sampled) == ("stop", [], 1)
    with pytest.raises(ValueError, match="1 to 96 tokens"):
        engine.start(PROMPTS[0] * 100, GREEDY)


def test_sampling_parameters(model):
    prompt = PROMPTS[2]
    greedy = run_alone(Engine(model, max_rows=1), prompt)
    for params in (SamplingParams(max_tokens=24, top_k=1), SamplingParams(max_tokens=24, top_p=1e-6)):
        assert run_alone(Engine(model, max_rows=1), prompt, params) == greedy
    seeded = SamplingParams(max_tokens=24, temperature=1.5, seed=7)
    first = run_alone(Engine(model, max_rows=1), prompt, seeded)
    assert run_alone(Engine(model, max_rows=1), prompt, seeded) == first != greedy
    # with top_k=3 every sampled token is among the 3 likeliest at its step
    engine = Engine(model, max_rows=1)
    out = run_alone(engine, prompt, SamplingParams(max_tokens=16, temperature=2.0, top_k=3, seed=1))
    with torch.no_grad():
        for i, token in enumerate(out):
            logits = model(torch.tensor([prompt + out[:i]]))[0][0, -1, :VOCAB_SIZE]
            assert token in logits.topk(3).indices.tolist()


def test_generate_streams_the_text_and_restores_train_mode(model):
    model.train()
    deltas = list(generate(model, PROMPTS[1], GREEDY))
    assert model.training
    model.eval()
    assert "".join(deltas) == decode(reference(model, PROMPTS[1], GREEDY))


def test_generate_batch_equals_generate_one_prompt_at_a_time(model):
    # more prompts than rows, repeated and of mixed lengths; a stop string ends some answers early
    prompts = PROMPTS * 3
    answers = []
    for params in (GREEDY, SamplingParams(max_tokens=24, temperature=0, stop=("e",))):
        alone = ["".join(generate(model, p, params)) for p in prompts]
        assert generate_batch(model, prompts, params, max_rows=3) == alone
        answers.append(alone)
    assert answers[0] != answers[1]  # the stop string did cut something
    assert generate_batch(model, [], GREEDY) == []


def stream(tokens: list[int], stop=()) -> list[str]:
    text = TextStream(stop)
    deltas = [text.push(t) for t in tokens]
    return [*deltas, text.flush()]


def test_logprobs_are_the_models_own(model):
    """Prompt tokens scored over chunk boundaries, and generated tokens, against a plain forward pass;
    the alternatives sorted, the chosen one among them whenever it is in the top k."""
    prompt = PROMPTS[3]
    engine = Engine(model, max_rows=2, prefill_chunk=5)  # the prompt takes several chunks
    scored = finish(engine, prompt, SamplingParams(max_tokens=0, temperature=0, logprobs=5, prompt_logprobs=True))
    assert scored.output == [] and scored.finish_reason == "length" and scored.prompt_logprobs[0] is None
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0][0, :, :VOCAB_SIZE].log_softmax(-1)
    assert len(scored.prompt_logprobs) == len(prompt)
    for i, (logprob, top) in enumerate(scored.prompt_logprobs[1:]):
        assert logprob == pytest.approx(expected[i, prompt[i + 1]].item(), abs=1e-5)
        assert [t for t, _ in top] == expected[i].topk(5).indices.tolist()
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)

    seq = finish(engine, prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=3))
    assert len(seq.logprobs) == len(seq.output) == 8 and seq.prompt_logprobs == []
    with torch.no_grad():
        full = model(torch.tensor([prompt + seq.output]))[0][0, :, :VOCAB_SIZE].log_softmax(-1)
    for j, (token, (logprob, top)) in enumerate(zip(seq.output, seq.logprobs)):
        assert logprob == pytest.approx(full[len(prompt) - 1 + j, token].item(), abs=1e-5)
        assert top[0][0] == token  # greedy: the chosen token is the likeliest
    # sampled with a temperature, the logprob is still the model's own, not the tempered one
    hot = finish(engine, prompt, SamplingParams(max_tokens=4, temperature=1.5, seed=3, logprobs=0))
    with torch.no_grad():
        full = model(torch.tensor([prompt + hot.output]))[0][0, :, :VOCAB_SIZE].log_softmax(-1)
    assert [lp for lp, _ in hot.logprobs] == pytest.approx(
        [full[len(prompt) - 1 + j, t].item() for j, t in enumerate(hot.output)], abs=1e-5)


def test_n_completions_share_one_prefill(model):
    """Completion i of n is what a lone request seeded seed + i gives; greedy, all n are the lone one."""
    engine = Engine(model, max_rows=4, prefill_chunk=8)
    prompt = PROMPTS[3]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, n=3)
    lead = engine.start(prompt, params)
    forwards = 0
    while engine.prefill_step() is None:
        forwards += 1
    assert forwards + 1 == -(-len(prompt) // 8)  # the prompt was fed once, not three times
    group = [lead, *lead.siblings]
    assert len(group) == 3 and len({s.row for s in group}) == 3
    while any(s.finish_reason is None for s in group):
        engine.decode_step()
    alone = [run_alone(Engine(model, max_rows=1), prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=11 + i))
             for i in range(3)]
    assert [s.output for s in group] == alone and len({tuple(a) for a in alone}) > 1
    greedy = finish(engine, prompt, SamplingParams(max_tokens=10, temperature=0, n=3))
    assert [s.output for s in [greedy, *greedy.siblings]] == [run_alone(Engine(model, max_rows=1), prompt, GREEDY)[:10]] * 3
    assert engine.has_room(4)  # every row free again
    with pytest.raises(ValueError):
        engine.start(prompt, SamplingParams(n=5))


def test_text_stream_never_splits_a_character():
    sample = "naïve café — 日本語のテキスト 😀👍🏽 and 한국어"
    tokens = encode(sample)
    deltas = stream(tokens)
    assert "".join(deltas) == sample
    assert all("\ufffd" not in d for d in deltas)
    # some token really is part of a character, so holding back was needed
    assert any(not d for d in deltas[:-1])


def test_text_stream_cuts_before_stop_strings():
    tokens = encode("Answer: 42\n### Instruction: more")
    assert "".join(stream(tokens, ["###"])) == "Answer: 42\n"
    assert "".join(stream(tokens, ["\n###", "Answer"])) == ""  # the earliest match wins, even at the start
    assert "".join(stream(tokens, ["not there", "##!"])) == "Answer: 42\n### Instruction: more"
    # text that could begin a stop string is held back until it cannot
    deltas = stream(encode("a ## b ### c"), ["###"])
    assert "".join(deltas) == "a ## b "
    assert "#" not in "".join(deltas[: len(encode("a ##"))])
    # a stop string made of multi-byte characters, arriving over several tokens
    assert "".join(stream(encode("価格は 😀 です"), ["😀"])) == "価格は "
