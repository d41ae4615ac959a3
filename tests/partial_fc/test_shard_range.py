import pytest

from partial_fc import shard_range


@pytest.mark.parametrize("C,W", [(37, 3), (10, 4), (8, 8), (3, 4), (1_000_003, 7), (12, 1)])
def test_ranges_tile_the_classes_contiguously(C, W):
    ranges = [shard_range(C, W, r) for r in range(W)]
    assert ranges[0][0] == 0
    for (s0, n0), (s1, _) in zip(ranges, ranges[1:]):
        assert s0 + n0 == s1
    assert sum(n for _, n in ranges) == C
    counts = [n for _, n in ranges]
    # The first C % W ranks own one more class.
    assert counts == [C // W + (r < C % W) for r in range(W)]


def test_example_37_over_3():
    assert [shard_range(37, 3, r) for r in range(3)] == [(0, 13), (13, 12), (25, 12)]


@pytest.mark.parametrize("args", [(0, 2, 0), (10, 0, 0), (10, 2, 2), (10, 2, -1)])
def test_bad_arguments_raise(args):
    with pytest.raises(ValueError):
        shard_range(*args)
