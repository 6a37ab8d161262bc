"""Reordering: valid permutations, shared within input groups, descending salience sums."""

import torch

from offline.reorder import Order, identity_order, salience_orders


def is_perm(p: torch.Tensor, n: int) -> bool:
    return p.dtype == torch.int32 and torch.equal(torch.sort(p.long()).values, torch.arange(n))


def test_orders_are_shared_permutations_sorted_by_salience():
    gen = torch.Generator().manual_seed(0)
    sal = {"q": torch.rand(12, 10, generator=gen), "k": torch.rand(4, 10, generator=gen),
           "o": torch.rand(10, 12, generator=gen), "solo": torch.rand(5, 7, generator=gen)}
    orders = salience_orders(sal, [("q", "k"), ("o",)])
    for name, s in sal.items():
        assert is_perm(orders[name].input_perm, s.shape[1])
        assert is_perm(orders[name].output_perm, s.shape[0])
        rows = s.sum(1)[orders[name].output_perm.long()]
        assert (rows[:-1] >= rows[1:]).all()
    assert torch.equal(orders["q"].input_perm, orders["k"].input_perm)
    group_cols = (sal["q"].sum(0) + sal["k"].sum(0))[orders["q"].input_perm.long()]
    assert (group_cols[:-1] >= group_cols[1:]).all()
    solo_cols = sal["solo"].sum(0)[orders["solo"].input_perm.long()]
    assert (solo_cols[:-1] >= solo_cols[1:]).all()


def test_ties_keep_the_original_order():
    orders = salience_orders({"x": torch.ones(6, 9)}, [])
    assert torch.equal(orders["x"].input_perm, identity_order(6, 9).input_perm)
    assert torch.equal(orders["x"].output_perm, identity_order(6, 9).output_perm)


def test_apply_gathers_rows_and_columns():
    m = torch.arange(12.).view(3, 4)
    order = Order(torch.tensor([3, 0, 1, 2], dtype=torch.int32),
                  torch.tensor([2, 0, 1], dtype=torch.int32))
    r = order.apply(m)
    assert r[0, 0] == m[2, 3] and r[1, 1] == m[0, 0] and r[2, 3] == m[1, 2]
