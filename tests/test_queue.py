"""Hippocampus queue: FIFO order, wrap-around, oversize batches, exact resume, errors."""

from __future__ import annotations

import io

import pytest
import torch

from trainer.losses import HippocampusQueue


def rows(start, num, dim=3):
    """Rows whose first coordinate is their global index, so order is visible."""
    x = torch.zeros(num, dim)
    x[:, 0] = torch.arange(start, start + num, dtype=torch.float32)
    return x


def ids(queue):
    neg = queue.negatives()
    return [] if neg is None else neg[:, 0].long().tolist()


def test_fifo_order_and_wrap_around():
    q = HippocampusQueue(5)
    assert q.negatives() is None and len(q) == 0
    q.enqueue(rows(0, 2))
    assert ids(q) == [0, 1]
    q.enqueue(rows(2, 2))
    assert ids(q) == [0, 1, 2, 3]
    q.enqueue(rows(4, 2))  # wraps: 0 falls out
    assert ids(q) == [1, 2, 3, 4, 5] and len(q) == 5
    q.enqueue(rows(6, 3))
    assert ids(q) == [4, 5, 6, 7, 8]
    q.enqueue(rows(9, 1))
    assert ids(q) == [5, 6, 7, 8, 9]


def test_batch_larger_than_queue_keeps_newest():
    q = HippocampusQueue(3)
    q.enqueue(rows(0, 1))
    q.enqueue(rows(1, 7))
    assert ids(q) == [5, 6, 7]
    q.enqueue(rows(8, 1))
    assert ids(q) == [6, 7, 8]


def test_entries_are_detached_float32():
    q = HippocampusQueue(4)
    x = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    q.enqueue(x)
    neg = q.negatives()
    assert neg.dtype == torch.float32 and not neg.requires_grad
    torch.testing.assert_close(neg, x.detach().float())


def test_size_zero_is_a_no_op():
    q = HippocampusQueue(0)
    q.enqueue(torch.randn(4, 3))
    assert q.negatives() is None and not q.enabled
    q.load_state_dict(q.state_dict())


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    batches = [torch.randn(3, 4) for _ in range(9)]
    straight = HippocampusQueue(7)
    for b in batches:
        straight.enqueue(b)
    first = HippocampusQueue(7)
    for b in batches[:5]:
        first.enqueue(b)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # the engine writes objective.pt with torch.save
    buf.seek(0)
    resumed = HippocampusQueue(7)
    resumed.load_state_dict(torch.load(buf))
    torch.testing.assert_close(resumed.negatives(), first.negatives(), rtol=0, atol=0)
    for b in batches[5:]:
        resumed.enqueue(b)
    torch.testing.assert_close(resumed.negatives(), straight.negatives(), rtol=0, atol=0)
    assert len(resumed) == len(straight) == 7


def test_state_dict_is_a_copy():
    q = HippocampusQueue(2)
    q.enqueue(torch.ones(1, 2))
    state = q.state_dict()
    q.enqueue(torch.zeros(2, 2))
    assert state["buffer"][0].tolist() == [1.0, 1.0] and state["count"] == 1


def test_errors():
    with pytest.raises(ValueError, match=">= 0"):
        HippocampusQueue(-1)
    q = HippocampusQueue(4)
    q.enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match="D=3"):
        q.enqueue(torch.randn(2, 5))
    with pytest.raises(ValueError, match="2-D"):
        q.enqueue(torch.randn(3))
    with pytest.raises(ValueError, match="queue_size is 8"):
        HippocampusQueue(8).load_state_dict(q.state_dict())
    with pytest.raises(ValueError, match="keys"):
        q.load_state_dict({"size": 4})
