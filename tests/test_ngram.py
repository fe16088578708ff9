"""The interpolated Kneser–Ney byte n-gram baseline: a valid distribution, the textbook formula, speed."""

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from layerwise.tasks.ngram import KneserNey

FORTUNES_DIR = Path("/usr/share/games/fortunes")
needs_fortunes = pytest.mark.skipif(
    not (FORTUNES_DIR / "cookie").is_file(), reason="needs 'sudo apt-get install fortunes fortunes-min'"
)
PROSE = (
    b"It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    b"must be in want of a wife. However little known the feelings or views of such a man may be on "
    b"his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    b"families, that he is considered the rightful property of some one or other of their daughters."
)


@pytest.mark.parametrize(
    ("data", "order"),
    [(PROSE, 4), (PROSE, 1), (b"abababababab", 3), (b"a" * 20, 3), (b"ab", 5), (bytes(range(256)) * 3, 2)],
)
def test_next_byte_probabilities_sum_to_one(data, order):
    model = KneserNey.fit(data, order)
    contexts = [b"", b"t", b"th", b" the", b"n of a good", b"\x00\x01\x02", b"zq", b"ab", b"a\xffa", b"aaaa"]
    for context in contexts:
        p = model.next_byte_probs(context)
        assert p.shape == (256,)
        assert abs(p.sum() - 1.0) < 1e-9, context
        assert p.min() > 0.0, context  # the uniform base leaves no byte impossible


def test_order_two_matches_a_hand_computation():
    model = KneserNey.fit(b"abracadabra", order=2)
    # Bigram counts: ab 2, br 2, ra 2, ac 1, ca 1, ad 1, da 1 -> n1 = 4, n2 = 3.
    d2 = 4 / (4 + 2 * 3)
    # Unigram continuation counts (distinct bytes before it; the leading "a" counts one start):
    # a 4 (r, c, d, start), b 1, r 1, c 1, d 1 -> total 8, 5 types, n1 = 4, n2 = 0.
    d1 = 4 / (4 + 2 * 0)

    def unigram(count: int) -> float:
        return max(count - d1, 0) / 8 + d1 * 5 / 8 / 256

    # After "a": ab 2, ac 1, ad 1 -> total 4, 3 types.
    p_b_after_a = (2 - d2) / 4 + d2 * 3 / 4 * unigram(1)
    p_z_after_a = 0 + d2 * 3 / 4 * unigram(0)
    # After "r": ra 2 -> total 2, 1 type.
    p_a_after_r = (2 - d2) / 2 + d2 * 1 / 2 * unigram(4)

    assert model.levels[1].discount == pytest.approx(d2)
    assert model.levels[0].discount == pytest.approx(d1)
    after_a = model.next_byte_probs(b"a")
    assert after_a[ord("b")] == pytest.approx(p_b_after_a, rel=1e-12)
    assert after_a[ord("z")] == pytest.approx(p_z_after_a, rel=1e-12)
    assert model.next_byte_probs(b"r")[ord("a")] == pytest.approx(p_a_after_r, rel=1e-12)
    assert model.next_byte_probs(b"z")[ord("a")] == pytest.approx(unigram(4), rel=1e-12)  # unseen context
    # The first byte has no history, so it is scored by the unigram level.
    assert np.exp2(model.log2_probs(b"ab")) == pytest.approx([unigram(4), p_b_after_a], rel=1e-12)


def _reference_probability(data: bytes, order: int, context: bytes, byte: int) -> float:
    """The same model with Python dicts, one n-gram at a time (slow, obviously written)."""
    levels = {order: Counter(data[i : i + order] for i in range(len(data) - order + 1))}
    for k in range(order - 1, 0, -1):
        levels[k] = Counter(gram[1:] for gram in levels[k + 1])  # one per distinct byte before it
        levels[k][data[:k]] += 1  # the start of the text counts as one more "byte before"
    p = 1 / 256
    for k in range(1, min(order, len(context) + 1) + 1):
        history = context[len(context) - (k - 1) :]
        counts = levels[k]
        n1 = sum(c == 1 for c in counts.values())
        n2 = sum(c == 2 for c in counts.values())
        discount = n1 / (n1 + 2 * n2) if n1 else 0.5
        followers = {gram: c for gram, c in counts.items() if gram[:-1] == history}
        total = sum(followers.values())
        if total:
            seen = followers.get(history + bytes([byte]), 0)
            p = (max(seen - discount, 0) + discount * len(followers) * p) / total
    return p


def test_order_three_matches_a_dictionary_reference():
    model = KneserNey.fit(PROSE, order=3)
    for context in [b"", b"t", b"th", b"a wife", b"zz", b"qu"]:
        expected = [_reference_probability(PROSE, 3, context, byte) for byte in range(256)]
        assert model.next_byte_probs(context) == pytest.approx(expected, rel=1e-12), context


def test_repetitive_text_costs_far_fewer_bits_than_random_bytes():
    rng = np.random.default_rng(0)
    random_model = KneserNey.fit(rng.bytes(50_000), order=3)
    random_bits = random_model.bits_per_byte(rng.bytes(10_000))
    # Nothing to learn: about a uniform guess, a little worse for the mass given to chance repeats.
    assert 7.9 < random_bits < 8.6
    sentence = b"the cat sat on the mat. "
    repetitive_bits = KneserNey.fit(sentence * 400, order=3).bits_per_byte(sentence * 40)
    assert repetitive_bits < 0.5


@needs_fortunes
def test_higher_orders_help_on_english_prose():
    text = b"".join((FORTUNES_DIR / name).read_bytes() for name in ("cookie", "computers", "science"))
    split = int(len(text) * 0.9)
    train, held_out = text[:split], text[split:]
    bits = [KneserNey.fit(train, order).bits_per_byte(held_out) for order in range(1, 6)]
    assert all(lower > higher for lower, higher in zip(bits, bits[1:], strict=False)), bits
    assert bits[0] > 4.0 and bits[4] < 3.0, bits


def test_bits_per_byte_is_the_mean_negative_log2_probability():
    model = KneserNey.fit(PROSE, order=4)
    held_out = b"It is a truth that a single woman in possession of a fortune..."
    log2_probs = model.log2_probs(held_out)
    assert log2_probs.shape == (len(held_out),)
    assert (log2_probs < 0).all()
    assert model.bits_per_byte(held_out) == pytest.approx(-log2_probs.mean(), rel=1e-12)
    assert model.description == "interpolated Kneser–Ney 4-gram over bytes"


def test_fit_and_score_are_vectorised():
    # 27 symbols in random order: millions of distinct 5-grams, the costly case for counting.
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)
    train = alphabet[rng.integers(0, len(alphabet), 2_000_000)].tobytes()
    held_out = alphabet[rng.integers(0, len(alphabet), 200_000)].tobytes()
    start = time.perf_counter()
    model = KneserNey.fit(train, order=5)
    model.bits_per_byte(held_out)
    assert time.perf_counter() - start < 20  # about 1 s on one core; a Python loop per position takes minutes


def test_sample_continues_a_learned_pattern():
    model = KneserNey.fit(b"abc" * 200, order=3)
    sampled = model.sample(b"ab", 30, np.random.default_rng(0))
    assert len(sampled) == 30
    assert sum(a == b for a, b in zip(sampled, b"cab" * 10, strict=True)) >= 27


@pytest.mark.parametrize("order", [0, 9])
def test_order_out_of_range_is_refused(order):
    with pytest.raises(ValueError, match="order must be between 1 and 8"):
        KneserNey.fit(PROSE, order)


def test_empty_data_is_refused():
    with pytest.raises(ValueError, match="empty"):
        KneserNey.fit(b"", 3)
    with pytest.raises(ValueError, match="empty"):
        KneserNey.fit(PROSE, 3).bits_per_byte(b"")
