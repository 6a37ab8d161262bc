import torch

from offline import allocation as alloc
from offline.layerwise_salience import layerwise_fisher
from offline.reorder import salience_orders
from offline.salience import fisher_diagonal
from offline.streaming import load_skeleton
from offline.targets import find_targets
from sfmp_serve.arch import arch_for
from sfmp_serve.format import LayerGeometry
from tests.offline_methods.test_sequential import calib, load


def allocation_of(salience, groups, geos, target=3.25):
    orders = salience_orders(salience, groups)
    importance = {n: alloc.block_sums(orders[n].apply(s), geos[n]) for n, s in salience.items()}
    sizes = {n: alloc.block_sizes(g) for n, g in geos.items()}
    result = alloc.allocate(importance, sizes, target, (3, 4))
    return orders, result.block_bits


def test_layerwise_fisher_equals_whole_model_fisher_and_gives_the_same_allocation(tiny_llama):
    ids = calib(3, 32)
    model = load(tiny_llama)
    spec = arch_for(model.config.model_type)
    targets = find_targets(model, spec)
    groups = targets.groups
    whole = fisher_diagonal(model, targets, ids)

    skeleton, source = load_skeleton(tiny_llama, spec)  # streamed: layers read per use
    streamed = layerwise_fisher(skeleton, find_targets(skeleton, spec), ids, source=source)
    assert streamed.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(streamed[name], whole[name], rtol=1e-4, atol=1e-12)

    geos = {t.name: LayerGeometry(t.out_features, t.in_features, 32, 16) for t in targets}
    orders_w, bits_w = allocation_of(whole, groups, geos)
    orders_s, bits_s = allocation_of(streamed, groups, geos)
    for name in whole:
        assert torch.equal(orders_w[name].input_perm, orders_s[name].input_perm), name
        assert torch.equal(orders_w[name].output_perm, orders_s[name].output_perm), name
        assert torch.equal(bits_w[name], bits_s[name]), name
