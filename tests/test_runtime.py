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


def test_kept_heap_is_scoped_reentrant_and_restored_after_an_error(monkeypatch):
    from fastdd import runtime

    monkeypatch.delenv(OPT_OUT_ENV, raising=False)
    monkeypatch.setattr(runtime, "_process_wide", False)
    calls = []
    monkeypatch.setattr(runtime, "_glibc_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    with pytest.raises(RuntimeError):
        with runtime.kept_heap():
            with runtime.kept_heap():
                assert runtime.kept_heap_active()
            assert runtime.kept_heap_active()
            raise RuntimeError("inside")
    assert not runtime.kept_heap_active()
    # Applied once by the outermost block, glibc's defaults restored once when it ends.
    assert calls == [(runtime._M_MMAP_MAX, 0), (runtime._M_TRIM_THRESHOLD, runtime._TRIM_THRESHOLD_BYTES),
                     (runtime._M_MMAP_MAX, runtime._DEFAULT_MMAP_MAX),
                     (runtime._M_TRIM_THRESHOLD, runtime._DEFAULT_TRIM_THRESHOLD_BYTES)]


def test_kept_heap_leaves_the_process_wide_setting_and_the_opt_out_alone(monkeypatch):
    from fastdd import runtime

    calls = []
    monkeypatch.setattr(runtime, "_glibc_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setattr(runtime, "_process_wide", True)
    with runtime.kept_heap():
        pass
    monkeypatch.setattr(runtime, "_process_wide", False)
    monkeypatch.setenv(OPT_OUT_ENV, "1")
    with runtime.kept_heap():
        assert not runtime.kept_heap_active()
    assert calls == []


def test_the_hot_loops_run_with_the_heap_kept(monkeypatch, generator):
    import torch
    from torch.nn.utils import parameters_to_vector

    from fastdd import runtime
    from fastdd.distill.trajectory import match_gradients
    from fastdd.models import build_model
    from fastdd.training import train_epoch
    from fastdd.trust.outlier_loss import integrated_loss

    monkeypatch.delenv(OPT_OUT_ENV, raising=False)
    monkeypatch.setattr(runtime, "_process_wide", False)
    monkeypatch.setattr(runtime, "_glibc_mallopt", lambda: lambda param, value: 1)
    seen = []

    def recording_loss(*args, **kwargs):
        seen.append(runtime.kept_heap_active())
        return integrated_loss(*args, **kwargs)

    net = build_model("convnet", channels=1, num_classes=2, image_size=8, width=4, depth=1, generator=generator)
    start = parameters_to_vector(net.parameters()).detach()
    images, labels = torch.randn(4, 1, 8, 8, generator=generator), torch.tensor([0, 1, 0, 1])
    match_gradients(net, images, labels, start, start + 0.01, 0.01, syn_steps=2, step_loss=recording_loss)
    train_epoch(net, torch.optim.SGD(net.parameters(), lr=0.01), images, labels, batch_size=2, generator=generator,
                objective=lambda n, x, y, g: seen.append(runtime.kept_heap_active()) or n(x).sum())
    assert seen and all(seen) and not runtime.kept_heap_active()
