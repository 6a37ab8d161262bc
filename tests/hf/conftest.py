import pytest

from tests.hf.checkpoints import make_sfmp_checkpoint


@pytest.fixture(scope="session")
def llama_ckpt(tiny_llama, tmp_path_factory):
    """SFMP checkpoint of the tiny Llama: 2/3/4-bit blocks of 16 x 32, random permutations."""
    return make_sfmp_checkpoint(tiny_llama, tmp_path_factory.mktemp("llama_ckpt") / "ckpt")


@pytest.fixture(scope="session")
def qwen3_ckpt(tiny_qwen3, tmp_path_factory):
    return make_sfmp_checkpoint(tiny_qwen3, tmp_path_factory.mktemp("qwen3_ckpt") / "ckpt",
                                seed=1)
