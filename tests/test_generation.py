"""greedy_generate and sample_generate: batched decoding with a KV cache
(antimemo.functional.generation)."""

import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers

from _builders import tiny_llama  # tests/ is on sys.path (pytest's rootdir-relative import)
from antimemo.functional import greedy_generate, sample_generate
from antimemo.functional.generation import (
    _cache_keyword,
    _sampling_probs,
    greedy_generate_with_logits,
)

VOCAB = 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: intra-op threads only add OpenMP overhead (and stall on a busy 2-core CI box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_llama(seed: int) -> transformers.LlamaForCausalLM:
    return tiny_llama(vocab=VOCAB, max_positions=128, seed=seed).eval()


def _tiny_gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(config).eval()


def _naive_greedy(model, prefixes, suffix_length):
    """Reference: re-run the whole sequence at every step, no cache, append the argmax."""
    sequence = prefixes.clone()
    with torch.no_grad():
        for _ in range(suffix_length):
            logits = model(input_ids=sequence).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence[:, prefixes.shape[1] :]


@pytest.fixture(scope="module")
def llama():
    return _tiny_llama(seed=0)


@pytest.fixture(scope="module")
def prefixes():
    return torch.randint(0, VOCAB, (7, 6), generator=torch.Generator().manual_seed(1))


def test_equals_naive_loop_on_tiny_llama(llama, prefixes):
    expected = _naive_greedy(llama, prefixes, suffix_length=10)
    got = greedy_generate(llama, prefixes, suffix_length=10, batch_size=3)
    assert got.shape == (7, 10) and got.dtype == torch.long
    assert torch.equal(got, expected)
    # the random model does not emit one constant token: the comparison is not vacuous
    assert len(set(expected.flatten().tolist())) > 3


def test_other_seeds_and_lengths_equal_naive_loop():
    for seed, (n, p, s) in zip(range(1, 4), [(5, 1, 7), (4, 12, 3), (3, 5, 1)]):
        model = _tiny_llama(seed)
        pre = torch.randint(0, VOCAB, (n, p), generator=torch.Generator().manual_seed(seed))
        got = greedy_generate(model, pre, s, batch_size=2)
        assert torch.equal(got, _naive_greedy(model, pre, s))


def test_batch_size_does_not_change_the_result(llama, prefixes):
    results = [greedy_generate(llama, prefixes, 8, batch_size=b) for b in (1, 2, 5, 7, 100)]
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_use_cache_false_matches_cached(llama, prefixes):
    assert torch.equal(
        greedy_generate(llama, prefixes, 6, batch_size=4, use_cache=False),
        greedy_generate(llama, prefixes, 6, batch_size=4),
    )


def test_leaves_mode_and_grad_state_alone(llama, prefixes):
    llama.train()
    try:
        out = greedy_generate(llama, prefixes[:2], 3)
        assert llama.training  # mode is the caller's business
    finally:
        llama.eval()
    assert not out.requires_grad
    assert all(p.grad is None for p in llama.parameters())
    assert torch.is_grad_enabled()


class SuccessorLM(torch.nn.Module):
    """Toy causal LM: the next token is (last token + 1) mod V; counts its calls.

    Its "KV cache" is the number of tokens seen so far, so a wrong cache use is detectable.
    """

    def __init__(self, vocab: int = 5):
        super().__init__()
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        self.calls.append((tuple(input_ids.shape), past_key_values))
        logits = torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float()
        seen = input_ids.shape[1] + (past_key_values or 0)
        return SimpleNamespace(logits=logits, past_key_values=seen if use_cache else None)


def test_never_stops_at_eos_and_reuses_the_cache():
    model = SuccessorLM(vocab=5)
    # prefix ends in 3: successors are 4, 0, 1, 2, 3, 4 (mod 5). Token 2 is Llama's default EOS
    # id and token 0 is a typical pad id; neither stops generation: exactly 6 tokens come out.
    prefixes = torch.tensor([[1, 2, 3], [0, 0, 1]])
    out = greedy_generate(model, prefixes, suffix_length=6, batch_size=1)
    assert out.tolist() == [[4, 0, 1, 2, 3, 4], [2, 3, 4, 0, 1, 2]]
    # per row: one prefill call on the 3-token prefix, then 5 one-token calls with the cache,
    # whose length grows 3, 4, 5, 6, 7
    row_calls = [((1, 3), None)] + [((1, 1), seen) for seen in (3, 4, 5, 6, 7)]
    assert model.calls == row_calls + row_calls


def test_uncached_path_accepts_plain_logits_models():
    class Plain(SuccessorLM):
        def forward(self, input_ids):
            return super().forward(input_ids).logits

    out = greedy_generate(Plain(vocab=7), torch.tensor([[5]]), suffix_length=4, use_cache=False)
    assert out.tolist() == [[6, 0, 1, 2]]  # 5+1, (6+1) mod 7, ...


def test_empty_batch_gives_empty_result(llama):
    out = greedy_generate(llama, torch.empty((0, 4), dtype=torch.long), 3)
    assert out.shape == (0, 3) and out.dtype == torch.long


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prefixes": torch.tensor([1, 2, 3])}, ValueError, r"2-D \[N, P\].*prefixes\[None\]"),
        ({"prefixes": torch.rand(2, 3)}, ValueError, r"integer token ids.*float32"),
        ({"prefixes": [[1, 2]]}, TypeError, "LongTensor"),
        ({"prefixes": torch.empty((2, 0), dtype=torch.long)}, ValueError, "at least one token"),
        ({"suffix_length": 0}, ValueError, "suffix_length must be an integer >= 1, got 0"),
        ({"suffix_length": 2.0}, ValueError, "suffix_length must be an integer"),
        ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments(llama, kwargs, error, match):
    args = {"prefixes": torch.zeros((2, 3), dtype=torch.long), "suffix_length": 2, **kwargs}
    with pytest.raises(error, match=match):
        greedy_generate(llama, **args)


def test_cache_needed_but_model_has_none():
    class Plain(SuccessorLM):
        def forward(self, input_ids, use_cache=False):
            return super().forward(input_ids).logits

    with pytest.raises(TypeError, match="use_cache=False"):
        greedy_generate(Plain(), torch.tensor([[1]]), 2)

    class NoCache(SuccessorLM):
        def forward(self, input_ids, use_cache=False, past_key_values=None):
            return SimpleNamespace(logits=super().forward(input_ids).logits, past_key_values=None)

    with pytest.raises(TypeError, match="no `past_key_values`.*use_cache=False"):
        greedy_generate(NoCache(), torch.tensor([[1]]), 2)


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class _CacheMessages:
    """Every warning (``warnings``) and every ``transformers`` log message emitted inside the
    block. transformers logs the ``output.past_key_values`` deprecation with ``warning_once`` (an
    lru_cache per process): the cache is cleared first so an earlier test cannot hide it."""

    def __enter__(self):
        clear = getattr(logging.Logger.warning_once, "cache_clear", None)
        if clear is not None:
            clear()
        self._catch = warnings.catch_warnings(record=True)
        self._warnings = self._catch.__enter__()
        warnings.simplefilter("always")
        self._handler = _Recorder()
        logging.getLogger("transformers").addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self._handler)
        self._catch.__exit__(*exc)

    def about_the_cache(self):
        texts = [str(w.message) for w in self._warnings] + self._handler.messages
        return [t for t in texts if "past_key_values" in t or ("cache" in t and "deprecat" in t)]


class _KwargsWrapper(torch.nn.Module):
    """A wrapper whose forward declares no cache keyword (like DDP or torch.compile)."""

    def __init__(self, inner):
        super().__init__()
        self.module = inner

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def test_no_cache_deprecation_and_equal_to_naive_loop(build):
    model = build(seed=4)
    pre = torch.randint(0, VOCAB, (5, 6), generator=torch.Generator().manual_seed(4))
    expected = _naive_greedy(model, pre, 7)
    assert len(set(expected.flatten().tolist())) > 2  # not one constant token
    # the recorder does see the deprecation when the cache is passed the pre-5.x way
    with _CacheMessages() as old_way:
        out = model(input_ids=pre, use_cache=True)
        model(input_ids=pre[:, :1], past_key_values=out.cache, use_cache=True)
    assert old_way.about_the_cache(), "this transformers no longer deprecates past_key_values="
    with _CacheMessages() as recorded:
        got = greedy_generate(model, pre, 7, batch_size=2)
        wrapped = greedy_generate(_KwargsWrapper(model), pre, 7, batch_size=3)
        for start, generated, _ in greedy_generate_with_logits(model, torch.cat(
                [pre, expected], dim=1), prefix_length=6, batch_size=4):
            assert torch.equal(generated, expected[start : start + len(generated)])
    assert recorded.about_the_cache() == []
    assert torch.equal(got, expected) and torch.equal(wrapped, expected)


def test_cache_keyword_follows_the_forward_signature(llama):
    assert _cache_keyword(llama) == "cache"  # transformers 5.x: past_key_values is deprecated
    assert _cache_keyword(_KwargsWrapper(_KwargsWrapper(llama))) == "cache"
    assert _cache_keyword(SuccessorLM()) == "past_key_values"  # hand-written, old keyword
    assert _cache_keyword(_KwargsWrapper(torch.nn.Identity())) == "past_key_values"


def test_hand_written_model_with_a_cache_keyword_gets_cache():
    class CacheLM(SuccessorLM):
        def forward(self, input_ids, cache=None, use_cache=False):
            out = super().forward(input_ids, past_key_values=cache, use_cache=use_cache)
            return SimpleNamespace(logits=out.logits, cache=out.past_key_values)

    model = CacheLM(vocab=5)
    out = greedy_generate(model, torch.tensor([[1, 2]]), suffix_length=3)
    assert out.tolist() == [[3, 4, 0]]
    assert model.calls == [((1, 2), None), ((1, 1), 2), ((1, 1), 3)]



# ------------------------------------------------------------------------------ sample_generate


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sample_is_deterministic_with_a_seeded_generator(llama, prefixes):
    kwargs = {"temperature": 1.3, "top_k": 20, "top_p": 0.95, "batch_size": 3}
    a = sample_generate(llama, prefixes, 9, generator=_seeded(5), **kwargs)
    b = sample_generate(llama, prefixes, 9, generator=_seeded(5), **kwargs)
    c = sample_generate(llama, prefixes, 9, generator=_seeded(6), **kwargs)
    assert a.shape == (7, 9) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the seed matters: 63 draws from ~20 tokens
    assert not torch.equal(a, greedy_generate(llama, prefixes, 9))  # it does sample
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB


def test_sample_leaves_the_global_rng_alone(llama, prefixes):
    torch.manual_seed(11)
    before = torch.get_rng_state()
    sample_generate(llama, prefixes, 4, generator=_seeded(0))
    assert torch.equal(torch.get_rng_state(), before)
    # without a generator the global RNG is what draws (and it advances)
    sample_generate(llama, prefixes, 4)
    assert not torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(11)
    x = sample_generate(llama, prefixes, 4)
    torch.manual_seed(11)
    assert torch.equal(sample_generate(llama, prefixes, 4), x)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_top_k_1_is_greedy(llama, prefixes, temperature):
    greedy = greedy_generate(llama, prefixes, 8, batch_size=3)
    for use_cache in (True, False):
        sampled = sample_generate(
            llama, prefixes, 8, temperature=temperature, top_k=1, batch_size=4,
            generator=_seeded(1), use_cache=use_cache,
        )
        assert torch.equal(sampled, greedy)


def test_sample_cached_equals_uncached_and_gpt2_works():
    for model in (_tiny_llama(seed=2), _tiny_gpt2(seed=2)):
        pre = torch.randint(0, VOCAB, (5, 3), generator=_seeded(2))
        with _CacheMessages() as recorded:
            cached = sample_generate(model, pre, 6, top_p=0.9, batch_size=2, generator=_seeded(3))
        uncached = sample_generate(
            model, pre, 6, top_p=0.9, batch_size=2, generator=_seeded(3), use_cache=False
        )
        assert recorded.about_the_cache() == []
        assert torch.equal(cached, uncached)


def test_bos_only_prompt_and_shapes(llama):
    bos = torch.full((10, 1), llama.config.bos_token_id)
    out = sample_generate(llama, bos, 1, batch_size=4, generator=_seeded(0))
    assert out.shape == (10, 1)
    assert sample_generate(llama, bos[:0], 3).shape == (0, 3)
    assert sample_generate(llama, bos.int(), 2, generator=_seeded(0)).dtype == torch.long


def test_sample_puts_the_model_in_eval_and_restores_every_mode(prefixes):
    model = _tiny_llama(seed=0)
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    try:
        out = sample_generate(model, prefixes[:2], 3, generator=_seeded(0))
    finally:
        hook.remove()
    assert seen and not any(seen)  # every forward ran in eval mode
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not out.requires_grad and all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, None, None),
        (0.7, None, None),
        (1.0, 5, None),
        (1.0, None, 0.8),
        (1.5, 7, 0.6),
        (0.3, 12, 0.9),
        (2.0, 1, 0.5),
        (1.0, 50, 0.3),  # top_k above the vocabulary: no truncation by k
        (1.0, None, 1.0),
    ],
)
def test_truncation_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = _seeded(7)
    logits = torch.randn(64, VOCAB, generator=g) * 3
    logits[:4, :3] = logits[:4, 3:4]  # ties at the top-k boundary (they are kept)
    ids = torch.zeros((64, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(float(temperature))(ids, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k=top_k)(ids, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p=top_p)(ids, scores)
    expected = scores.softmax(dim=-1)
    got = _sampling_probs(logits, temperature, top_k, top_p)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(got == 0, expected == 0)  # the same tokens are truncated
    if top_k is not None or (top_p is not None and top_p < 1):
        assert (got == 0).any()  # the truncation is exercised


def test_one_token_frequencies_match_the_softmax():
    """Draw one token 20000 times (batched) from a BOS prompt: every token's frequency lies
    within 4.5 binomial standard deviations of the truncated, renormalised softmax."""
    model = _tiny_llama(seed=3)
    bos = torch.full((1, 1), model.config.bos_token_id)
    temperature, top_k = 0.2, 6  # sharpen the random model's near-uniform distribution
    with torch.no_grad():
        logits = model(input_ids=bos).logits[0, -1]
    probs = _sampling_probs(logits[None], temperature, top_k, None)[0].double()
    draws = 20000
    out = sample_generate(
        model, bos.expand(draws, 1), 1, temperature=temperature, top_k=top_k, batch_size=5000,
        generator=_seeded(0),
    )
    counts = torch.bincount(out[:, 0], minlength=VOCAB).double()
    assert counts[probs == 0].sum() == 0  # never a truncated token
    sd = (draws * probs * (1 - probs)).sqrt()
    assert torch.all((counts - draws * probs).abs() <= 4.5 * sd + 1e-9)
    assert probs.max() < 0.9 and (probs > 0.02).sum() >= 3  # not a degenerate distribution


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0}, ValueError, r"temperature must be > 0, got 0.*greedy_generate"),
        ({"temperature": 0.0}, ValueError, r"greedy_generate"),
        ({"temperature": -1.0}, ValueError, r"temperature must be a finite number > 0, got -1.0"),
        ({"temperature": float("nan")}, ValueError, r"temperature must be a finite number > 0"),
        ({"temperature": True}, ValueError, r"temperature must be a finite number > 0, got True"),
        ({"top_k": 0}, ValueError, r"top_k must be None or an integer >= 1, got 0; e.g. top_k=40"),
        ({"top_k": 2.0}, ValueError, r"top_k must be None or an integer >= 1, got 2.0"),
        ({"top_p": 0.0}, ValueError, r"top_p must be None or a number in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, ValueError, r"top_p must be None or a number in \(0, 1\], got 1.5"),
        ({"num_tokens": 0}, ValueError, r"num_tokens must be an integer >= 1, got 0"),
        ({"batch_size": 0}, ValueError, r"batch_size must be an integer >= 1, got 0"),
        ({"generator": 0}, TypeError, r"generator must be a torch.Generator or None, got int"),
        ({"use_cache": 1}, TypeError, r"use_cache must be a bool, got 1"),
        ({"prompts": torch.tensor([1, 2])}, ValueError, r"prompts must be 2-D.*prompts\[None\]"),
        ({"prompts": torch.rand(2, 3)}, ValueError, r"prompts must hold integer token ids"),
        ({"prompts": [[1]]}, TypeError, r"prompts must be a LongTensor"),
        ({"prompts": torch.empty((2, 0), dtype=torch.long)}, ValueError, "at least one token"),
    ],
)
def test_sample_bad_arguments(llama, kwargs, error, match):
    args = {"prompts": torch.zeros((2, 3), dtype=torch.long), "num_tokens": 2, **kwargs}
    with pytest.raises(error, match=match):
        sample_generate(llama, **args)


def test_sample_generator_on_another_device_is_refused():
    model = SuccessorLM()
    model.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))  # the model is on "meta"
    with pytest.raises(ValueError, match=r"generator is on cpu but the model is on meta.*device="):
        sample_generate(model, torch.tensor([[1]]), 2, generator=_seeded(0))


def test_sample_without_cache_support_names_sample_generate():
    class Plain(SuccessorLM):
        def forward(self, input_ids, use_cache=False):
            return super().forward(input_ids).logits

    with pytest.raises(TypeError, match=r"sample_generate\(use_cache=True\).*use_cache=False"):
        sample_generate(Plain(), torch.tensor([[1]]), 2)
    out = sample_generate(
        Plain(vocab=7), torch.tensor([[5]]), 3, temperature=0.01, use_cache=False,
        generator=_seeded(0),
    )
    assert out.tolist() == [[6, 0, 1]]  # one-hot logits / 0.01: exp(-100) for any other token
