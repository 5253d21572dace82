"""Fixtures that several test modules share."""

import pytest


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """$BRAINSEG_CACHE for one test module: the preprocessed caches its runs build go to a temporary folder,
    never to the checkout's data/cache (the default). Use with `pytestmark = pytest.mark.usefixtures("cache_root")`
    or as an argument of a module-scoped fixture that builds caches."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("cache")
        patch.setenv("BRAINSEG_CACHE", str(root))
        yield root
