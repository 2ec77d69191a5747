import sys

import pytest

from fastdd.runtime import OPT_OUT_ENV, keep_freed_memory


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv(OPT_OUT_ENV, "1")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_applies_on_glibc(monkeypatch):
    import platform

    monkeypatch.delenv(OPT_OUT_ENV, raising=False)
    expected = platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected
