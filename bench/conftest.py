"""Options of the benchmark suite (see bench/test_bench.py)."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-shapes", default=None,
                     help="comma-separated shape names (csra_triton.tools.benchmark.parse_shapes syntax); "
                          "default: every benchmark shape (CUDA only) plus the tiny smoke shapes")


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
