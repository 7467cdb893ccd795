"""Compute streams: discovery, selection, running work, zero-copy views, device copies."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from nautilus_pipeline.compute import choose, create_stream, discover, unusable_reason
from nautilus_pipeline.errors import BackendUnavailableError, ConfigError
from nautilus_pipeline.memory import BufferPool

torch = pytest.importorskip("torch", reason="torch is not installed")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="torch:cuda: no CUDA device on this machine")


def test_discovery_lists_every_stream_with_a_reason():
    infos = {b.name: b for b in discover()}
    assert infos["cpu"].usable
    assert set(infos) >= {"cpu", "torch:cpu", "torch:cuda", "mlx:gpu", "coreml:ane"}
    for info in infos.values():
        assert info.reason, f"{info.name} must say why (not) usable"
    import platform

    if platform.system() != "Darwin":
        assert not infos["coreml:ane"].usable
        assert "macOS" in infos["coreml:ane"].reason


def test_choose_takes_the_first_usable_and_names_what_it_skipped():
    sel = choose(["coreml:ane", "torch:cuda", "torch:cpu", "cpu"], stage="inference")
    expected = "torch:cuda" if HAS_CUDA else "torch:cpu"
    assert sel.primary == (expected if unusable_reason("coreml:ane") else "coreml:ane")
    assert sel.fallback is not None
    assert all(reason for _, reason in sel.skipped)


def test_choose_with_nothing_usable_explains_every_entry():
    if unusable_reason("coreml:ane") is None:
        pytest.skip("Core ML is usable here (macOS): nothing to refuse")
    with pytest.raises(BackendUnavailableError, match="coreml:ane: Core ML"):
        choose(["coreml:ane"], stage="inference")


def test_unknown_stream_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown compute stream"):
        choose(["tpu"], stage="x")


async def test_cpu_stream_runs_inline_or_on_its_own_thread():
    inline = create_stream("cpu")
    assert await inline.run(lambda a, b: a + b, 2, 3) == 5
    offloaded = create_stream("cpu", offload=True)
    loop_thread = threading.get_ident()
    ran_on = await offloaded.run(threading.get_ident)
    assert ran_on != loop_thread
    offloaded.close()


async def ticks_while(awaitable, pause: float = 0.0) -> int:
    """How often the event loop ran another task while ``awaitable`` was awaited."""
    ticks = 0
    done = False

    async def ticker():
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(pause)

    t = asyncio.ensure_future(ticker())
    await awaitable
    done = True
    await t
    return ticks


async def test_offloaded_work_keeps_the_loop_responsive():
    stream = create_stream("cpu", offload=True)
    svd = stream.run(lambda: np.linalg.svd(np.random.default_rng(0).random((400, 400))))
    ticks = await ticks_while(svd, pause=0.001)
    stream.close()
    assert ticks > 1, "the loop ran other work while the kernel ran"


async def test_offloaded_stream_keeps_call_order():
    stream = create_stream("cpu", offload=True)
    order: list[int] = []
    await asyncio.gather(*(stream.run(order.append, i) for i in range(50)))
    stream.close()
    assert order == list(range(50))


async def test_torch_cpu_views_share_the_slab_memory():
    stream = create_stream("torch:cpu")
    pool = BufferPool(capacity=32, slabs=1)
    lease = await pool.acquire("x")
    lease.length = 8
    lease["price"][:] = np.arange(8)
    t = stream.to_device(lease, "price")
    assert isinstance(t, torch.Tensor)
    assert np.shares_memory(t.numpy(), lease.slab.columns["price"])
    out = await stream.run(lambda x: x * 2, t)
    stream.to_host(lease, "size", out)
    assert lease["size"].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert pool.stats().bytes_copied_h2d == 0, "no copies on the CPU path"
    lease.release("x")


async def test_mlx_cpu_stream_runs_on_its_thread():
    mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
    stream = create_stream("mlx:cpu")
    pool = BufferPool(capacity=16, slabs=1)
    lease = await pool.acquire("x")
    lease.length = 4
    lease["price"][:] = [1, 2, 3, 4]
    x = stream.to_device(lease, "price")
    out = await stream.run(lambda a: mx.sum(a * a), x)
    assert float(out) == 30.0
    assert pool.stats().bytes_copied_h2d == 32, "mx.array(numpy) copies, and the copy is counted"
    lease.release("x")
    stream.close()


@needs_cuda
async def test_cuda_stream_copies_once_and_counts_bytes():
    pool = BufferPool(capacity=1024, slabs=2, memory="pinned")
    a = create_stream("torch:cuda")
    b = create_stream("torch:cuda")
    lease = await pool.acquire("x")
    lease.length = 1024
    lease["price"][:] = np.arange(1024)
    x = a.to_device(lease, "price")
    assert x.is_cuda
    y = b.to_device(lease, "price")  # second GPU stage: cached, not copied again
    assert pool.stats().copies_h2d == 1
    assert pool.stats().bytes_copied_h2d == 1024 * 8
    out = await b.run(lambda t: t * 3, y)
    await b.run(b.to_host, lease, "size", out)
    assert pool.stats().copies_d2h == 1
    np.testing.assert_array_equal(lease["size"], np.arange(1024) * 3)
    lease.release("x")
    a.close()
    b.close()


@needs_cuda
async def test_cuda_work_does_not_block_the_loop():
    stream = create_stream("torch:cuda")
    x = torch.randn(4096, 4096, device="cuda")
    ticks = await ticks_while(stream.run(lambda: [x @ x for _ in range(20)][-1].sum()))
    stream.close()
    assert ticks > 1


def test_a_stream_names_its_runner_backend_and_kernel_device():
    """Stages ask the stream (one registry), never parse its name: ``cpu`` is the numpy runner."""
    from nautilus_pipeline.compute import runner_backend

    assert runner_backend("cpu") == runner_backend("numpy") == "numpy"
    assert runner_backend("torch") == "torch:cpu"
    cpu = create_stream("cpu")
    try:
        assert (cpu.backend, cpu.kernel_device, cpu.runner_backend) == ("numpy", None, "numpy")
    finally:
        cpu.close()
    if unusable_reason("torch:cpu") is None:
        t = create_stream("torch:cpu")
        try:
            assert (t.backend, t.kernel_device, t.runner_backend) == ("torch", "cpu", "torch:cpu")
        finally:
            t.close()
    with pytest.raises(ConfigError, match="unknown compute stream"):
        runner_backend("gpu:quantum")
