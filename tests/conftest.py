"""Two tiers: ``pytest -q tests`` runs the fast one (unit tests, reference forwards, in-process runs); ``--full`` adds
the slow one (torchrun launches, signals and kills, the SLURM launcher, filled disks, torch.compile, the documented
commands run as written), which CI runs."""
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="also run the tests marked slow (what CI runs)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test of the full tier (torchrun, signals, kills, the launcher, "
                                       "filled disks, compile, the documented commands); run with --full")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--full"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
