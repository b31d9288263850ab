"""Reservoir buffer: uniform sample of the stream, vectorised insert, sampling without replacement."""
import torch

from sparsecl.data.buffer import ReservoirBuffer


def test_fills_in_order_then_keeps_capacity():
    buf = ReservoirBuffer(5, "cpu")
    buf.add(x=torch.arange(3).unsqueeze(1), y=torch.arange(3))
    assert len(buf) == 3
    (y,) = buf.all("y")
    assert y.tolist() == [0, 1, 2]
    buf.add(x=torch.arange(3, 10).unsqueeze(1), y=torch.arange(3, 10))
    assert len(buf) == 5 and buf.seen == 10
    (y,) = buf.all("y")
    assert len(set(y.tolist())) == 5  # no duplicates: each stored example is a distinct stream element


def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    torch.manual_seed(0)
    n, cap, trials = 400, 40, 300
    counts = torch.zeros(n)
    for _ in range(trials):
        buf = ReservoirBuffer(cap, "cpu")
        for start in range(0, n, 16):  # batches larger than 1 exercise the in-batch collision rule
            ids = torch.arange(start, min(start + 16, n))
            buf.add(x=ids.unsqueeze(1), y=ids)
        (y,) = buf.all("y")
        counts[y] += 1
    freq = counts / trials
    expected = cap / n  # 0.1 for every element, early or late
    # Binomial std of one element's frequency is sqrt(0.1*0.9/300) ~ 0.017; compare halves and tails.
    assert abs(freq[: n // 2].mean() - expected) < 0.01
    assert abs(freq[n // 2 :].mean() - expected) < 0.01
    assert abs(freq[:50].mean() - freq[-50:].mean()) < 0.02
    assert (freq - expected).abs().max() < 0.08


def test_in_batch_collision_last_writer_wins_and_nothing_is_lost():
    torch.manual_seed(1)
    buf = ReservoirBuffer(2, "cpu")
    buf.add(x=torch.zeros(2, 1), y=torch.tensor([0, 1]))
    for i in range(50):  # a big batch into a tiny buffer forces collisions
        ids = torch.arange(2 + 100 * i, 2 + 100 * (i + 1))
        buf.add(x=ids.unsqueeze(1).float(), y=ids)
        (x, y) = buf.all("x", "y")
        assert x.squeeze(1).long().tolist() == y.tolist()  # fields of a row always belong together
        assert len(set(y.tolist())) == 2


def test_sample_is_without_replacement_and_bounded_by_size():
    buf = ReservoirBuffer(10, "cpu")
    buf.add(x=torch.arange(6).unsqueeze(1), y=torch.arange(6))
    idx, y = buf.sample(32, "y")
    assert len(idx) == 6 and sorted(y.tolist()) == list(range(6))


def test_state_roundtrip():
    buf = ReservoirBuffer(4, "cpu")
    buf.add(x=torch.arange(9).unsqueeze(1), y=torch.arange(9), logits=torch.randn(9, 3))
    other = ReservoirBuffer(4, "cpu")
    other.load_state_dict(buf.state_dict())
    assert other.seen == 9
    for a, b in zip(buf.all("x", "y", "logits"), other.all("x", "y", "logits")):
        assert torch.equal(a, b)
