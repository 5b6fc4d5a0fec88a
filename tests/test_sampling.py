import math

import numpy as np
import pytest
import torch
from rwkv.utils import PIPELINE, PIPELINE_ARGS

from goose.sampling import PenaltyTracker, SamplingParams, sample, sampling_probs

# A hand-made distribution, most probable first.
P5 = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
L5 = P5.log()


def support(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0).flatten().tolist())


def official_probs(logits: torch.Tensor, monkeypatch, **kwargs) -> torch.Tensor:
    """The final distribution of the official PIPELINE.sample_logits (CPU path), captured at its
    np.random.choice call."""
    seen = {}

    def choice(a, p):
        seen["p"] = p.copy()
        return int(np.argmax(p))

    monkeypatch.setattr(np.random, "choice", choice)
    PIPELINE.__new__(PIPELINE).sample_logits(logits.clone(), **kwargs)
    monkeypatch.undo()
    return torch.from_numpy(seen["p"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1), dict(temperature=math.inf), dict(top_p=1.5), dict(top_p=-0.1),
        dict(top_k=-1), dict(top_k=2.0), dict(min_p=2.0), dict(presence_penalty=math.nan),
        dict(penalty_decay=1.1), dict(max_tokens=-1), dict(seed=1.5), dict(token_ban=(-1,)),
        dict(stop_tokens=("a",)), dict(stop_strings=("",)), dict(stop_strings="ab"),
    ],
)
def test_params_validation(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"SamplingParams.{name}: expected .*, got"):
        SamplingParams(**kwargs)


def test_params_lists_become_tuples():
    p = SamplingParams(token_ban=[3, 4], stop_strings=["\n\n"])
    assert p.token_ban == (3, 4) and p.stop_strings == ("\n\n",)
    assert hash(p) == hash(SamplingParams(token_ban=(3, 4), stop_strings=("\n\n",)))


def test_greedy():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0, top_p=0.1, top_k=3)
    torch.testing.assert_close(sample(logits, p), logits.argmax(-1))
    assert sample(logits[1], p).shape == () and int(sample(logits[1], p)) == int(logits[1].argmax())
    probs = sampling_probs(logits, p)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 100).float())


@pytest.mark.parametrize(
    "top_p, expected",
    [(0.0, {0}), (0.4, {0}), (0.6, {0, 1}), (0.8, {0, 1, 2}), (0.9, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3, 4})],
)
def test_top_p(top_p, expected):
    probs = sampling_probs(L5, SamplingParams(top_p=top_p))
    assert support(probs) == expected
    kept = P5[sorted(expected)]
    torch.testing.assert_close(probs[sorted(expected)], kept / kept.sum())


def test_top_p_keeps_ties_at_cutoff():
    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0])
    # cumulative mass reaches 0.5 at the first 1.0-logit token: all its ties survive, the tail does not
    assert support(sampling_probs(logits, SamplingParams(top_p=0.5))) == {0, 1, 2, 3}
    assert support(sampling_probs(torch.zeros(6), SamplingParams(top_p=0.0))) == set(range(6))


ALL5 = {0, 1, 2, 3, 4}


@pytest.mark.parametrize("top_k, expected", [(0, ALL5), (1, {0}), (3, {0, 1, 2}), (5, ALL5), (9, ALL5)])
def test_top_k(top_k, expected):
    assert support(sampling_probs(L5, SamplingParams(top_p=1.0, top_k=top_k))) == expected


@pytest.mark.parametrize("min_p, expected", [(0.0, ALL5), (0.25, {0, 1, 2}), (0.35, {0, 1}), (1.0, {0})])
def test_min_p(min_p, expected):
    assert support(sampling_probs(L5, SamplingParams(top_p=1.0, min_p=min_p))) == expected


def test_filters_intersect_on_unfiltered_probs():
    # top-p is measured on the full distribution, not renormalised after top-k
    assert support(sampling_probs(L5, SamplingParams(top_p=0.8, top_k=2))) == {0, 1}
    assert support(sampling_probs(L5, SamplingParams(top_p=0.6, top_k=4))) == {0, 1}
    assert support(sampling_probs(L5, SamplingParams(top_p=0.9, top_k=4, min_p=0.35))) == {0, 1}


@pytest.mark.parametrize("temperature", [0.25, 0.5, 2.0])
def test_temperature_after_filtering(temperature):
    probs = sampling_probs(L5, SamplingParams(top_p=0.8, temperature=temperature))
    kept = P5[:3].double() ** (1 / temperature)
    torch.testing.assert_close(probs[:3].double(), kept / kept.sum(), rtol=1e-5, atol=1e-7)
    assert support(probs) == {0, 1, 2}


def test_tiny_temperature_does_not_underflow():
    probs = sampling_probs(torch.tensor([0.0, -0.1, -50.0]), SamplingParams(top_p=1.0, temperature=1e-3))
    assert torch.isfinite(probs).all() and probs[0] > 0.999


def test_batch_with_mixed_params():
    logits = torch.stack([L5, L5, L5])
    params = [SamplingParams(top_p=0.6), SamplingParams(temperature=0), SamplingParams(top_p=1.0, top_k=3)]
    probs = sampling_probs(logits, params)
    assert [support(row) for row in probs] == [{0, 1}, {0}, {0, 1, 2}]
    for row, p in zip(probs, params):
        torch.testing.assert_close(row, sampling_probs(L5, p))
    with pytest.raises(ValueError, match="one SamplingParams per row"):
        sampling_probs(logits, params[:2])


def test_top_p_one_keeps_everything_unlike_official(monkeypatch):
    logits = torch.randn(65536, generator=torch.Generator().manual_seed(0)) * 3
    ours = sampling_probs(logits, SamplingParams(top_p=1.0))
    assert support(ours) == support(torch.softmax(logits, -1))
    # the official fp32 cumulative sum ends below 1.0 here, so it keeps only the top token
    assert np.cumsum(np.sort(torch.softmax(logits, -1).numpy())[::-1])[-1] < 1.0
    assert support(official_probs(logits, monkeypatch, temperature=1.0, top_p=1.0)) == {int(logits.argmax())}


@pytest.mark.parametrize("vocab", [50, 65536])
@pytest.mark.parametrize(
    "temperature, top_p, top_k",
    [(1.0, 0.85, 0), (0.7, 0.5, 0), (1.5, 0.95, 0), (1.0, 0.99, 20), (0.8, 0.3, 5), (0.0, 0.85, 0), (1.0, 0.0, 0)],
)
def test_matches_official_sample_logits(monkeypatch, vocab, temperature, top_p, top_k):
    gen = torch.Generator().manual_seed(vocab + int(100 * top_p) + top_k)
    for _ in range(3):
        logits = torch.randn(vocab, generator=gen) * 4
        ref = official_probs(logits, monkeypatch, temperature=temperature, top_p=top_p, top_k=top_k)
        ours = sampling_probs(logits, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k))
        assert support(ours) == support(ref)
        torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-7)


def test_empirical_distribution_matches():
    """200k draws from a filtered, tempered distribution: no draw outside the support, and Pearson's
    chi-square against the expected counts below the 0.999 quantile of chi2(df=3), 16.27."""
    logits = torch.tensor([1.0, 0.5, 0.3, 0.0, -0.2, -1.0, -3.0, -4.0])
    params = SamplingParams(top_p=0.8, temperature=0.7)
    expected = sampling_probs(logits, params).double()
    n = 200_000
    tokens = sample(logits.expand(n, -1), params, torch.Generator().manual_seed(1234))
    counts = torch.bincount(tokens, minlength=8).double()
    kept = expected > 0
    assert kept.sum() == 4 and counts[~kept].sum() == 0
    chi2 = (((counts - n * expected)[kept]) ** 2 / (n * expected[kept])).sum()
    assert chi2 < 16.27, (counts, n * expected)


def test_seeded_and_per_row_generators():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(top_p=1.0)

    def draw(seed, rows=logits, steps=20):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample(rows, p, g) for _ in range(steps)])

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    # with one generator per row, a row's tokens do not depend on the rest of the batch
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = torch.stack([sample(logits, [p, SamplingParams(temperature=0), p], gens) for _ in range(20)])
    assert torch.equal(batch[:, 1], logits[1].argmax().expand(20))
    for row, seed in ((0, 1), (2, 3)):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(batch[:, row], torch.stack([sample(logits[row], p, g) for _ in range(20)]))


TEXTS = ["", " ", "\t", "7", "12", "  ", "0123", "a", "bc", "\n", "x", "y", "z", "w", "v", "u"]


def fake_decode(ids: list[int]) -> str:
    return "".join(TEXTS[i] for i in ids)


def reference_penalties(logits, occurrence, p):
    """The official PIPELINE.generate penalty step, transcribed."""
    out = logits.clone()
    for n in p.token_ban:
        out[n] = -math.inf
    for n in occurrence:
        out[n] -= p.presence_penalty + occurrence[n] * p.frequency_penalty
    return out


def reference_update(occurrence, token, p):
    for n in occurrence:
        occurrence[n] *= p.penalty_decay
    w = 0 if fake_decode([token]) in " \t0123456789" else 1
    occurrence[token] = occurrence.get(token, 0) + w


def test_penalties_match_reference_loop():
    p = SamplingParams(presence_penalty=0.3, frequency_penalty=0.7, penalty_decay=0.9, token_ban=(9,))
    forced = [1, 7, 7, 2, 4, 5, 6, 7, 1, 3, 8, 8, 8, 10, 7]  # whitespace/digit tokens among repeats
    tracker = PenaltyTracker(p, 16, fake_decode)
    occurrence: dict[int, float] = {}
    gen = torch.Generator().manual_seed(0)
    for token in forced:
        logits = torch.randn(16, generator=gen)
        ours = tracker.apply(logits[None])[0]
        torch.testing.assert_close(ours, reference_penalties(logits, occurrence, p))
        tracker.update([token])
        reference_update(occurrence, token, p)
    # weight-0 tokens (" ", "7", "12", "0123", "\t") still get the presence penalty; "  " and "" count
    assert tracker.seen[0, [1, 2, 3, 4, 6]].all() and (tracker.occurrence[0, [1, 2, 3, 4, 6]] == 0).all()
    assert tracker.weight(5) == 1.0 and tracker.weight(0) == 1.0
    assert tracker.occurrence[0, 7] == pytest.approx(occurrence[7])


def test_batched_tracker_and_select():
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.1, penalty_decay=0.5),
              SamplingParams(token_ban=(3,)),
              SamplingParams(presence_penalty=0.0, frequency_penalty=1.0, penalty_decay=1.0)]
    batch = PenaltyTracker(params, 16, fake_decode)
    singles = [PenaltyTracker(p, 16, fake_decode) for p in params]
    steps = torch.randint(0, 16, (10, 3), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(3, 16)
    for row in steps:
        batch.update(row)
        for s, t in zip(singles, row.tolist()):
            s.update([t])
    expected = torch.cat([s.apply(logits[i:i + 1]) for i, s in enumerate(singles)])
    torch.testing.assert_close(batch.apply(logits), expected)
    sub = batch.select([2, 0])
    torch.testing.assert_close(sub.apply(logits[[2, 0]]), expected[[2, 0]])
    assert batch.batch_size == 3 and sub.batch_size == 2
    with pytest.raises(ValueError, match="vocab_size"):
        PenaltyTracker(SamplingParams(token_ban=(16,)), 16, fake_decode)


class FakeModel:
    """Next-token logits looked up from the last input token (official forward(tokens, state) API)."""

    def __init__(self, table):
        self.table = table
        self.fed: list[list[int]] = []

    def forward(self, tokens, state):
        self.fed.append(list(tokens))
        return self.table[tokens[-1]].clone(), state


class FakeVocab:  # (a name containing "Tokenizer" would switch PIPELINE.encode to the HF API)
    def encode(self, text):
        return [int(c) for c in text.split(",")]

    def decode(self, ids):
        return fake_decode(ids)


def test_penalised_greedy_matches_official_generate():
    """End to end against PIPELINE.generate (greedy, so its numpy RNG plays no part)."""
    table = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    table[:, 11] += 3.0  # without penalties greedy decoding would repeat token 11 forever
    p = SamplingParams(temperature=0, presence_penalty=0.4, frequency_penalty=0.4, penalty_decay=0.9, token_ban=(12,))
    args = PIPELINE_ARGS(temperature=0, alpha_presence=0.4, alpha_frequency=0.4, alpha_decay=0.9, token_ban=[12])
    pipe = PIPELINE.__new__(PIPELINE)
    pipe.model, pipe.tokenizer = FakeModel(table), FakeVocab()
    pipe.generate("1,13", token_count=40, args=args)
    official = [t[0] for t in pipe.model.fed[1:]]  # tokens fed back after the prompt = the sampled ones

    tracker, last, ours = PenaltyTracker(p, 16, fake_decode), 13, []
    for _ in range(len(official)):
        token = int(sample(tracker.apply(table[last][None]), p)[0])
        tracker.update([token])
        ours.append(last := token)
    assert ours == official
    assert len(set(ours)) > 3 and 12 not in ours
