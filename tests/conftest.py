import os

import pytest

# No hub at run time: every weight comes from an installed package or a local dir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def model():
    from core.model import MultimodalModel

    return MultimodalModel.load(device="cpu")
