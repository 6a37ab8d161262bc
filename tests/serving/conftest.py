import pytest


@pytest.fixture(scope="session")
def serving_checkpoint(tmp_path_factory):
    """One pipeline-quantized tiny checkpoint for every serving test that needs vLLM."""
    from tests.serving.checkpoints import make_serving_checkpoint
    return make_serving_checkpoint(tmp_path_factory.mktemp("serving"))
