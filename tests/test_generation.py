"""greedy_generate: batched greedy decoding with a KV cache (antimemo.functional.generation)."""

import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers

from _builders import tiny_llama  # tests/ is on sys.path (pytest's rootdir-relative import)
from antimemo.functional import greedy_generate
from antimemo.functional.generation import _cache_keyword, greedy_generate_with_logits

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
