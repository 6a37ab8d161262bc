import os

import pytest
import torch

# Two cores shared by the whole suite: one intra-op thread keeps parallel tests from thrashing.
torch.set_num_threads(int(os.environ.get("SFMP_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tests.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    from tests.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3", hidden=80,
                           intermediate=176, heads=4, kv_heads=2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
