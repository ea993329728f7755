"""Make the repository root importable and register the `network` marker."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "network: needs the internet; runs only when TERACON_NETWORK_TESTS=1")
