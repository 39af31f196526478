"""Work items on a pool of Python threads, and per-thread scratch buffers, for the CPU kernels.

Two habits of the small shared VMs this project runs on shape the CPU kernels, and both live
here so that every kernel applies them the same way:

* **Scratch buffers are cached per thread** (:func:`scratch`): first-touch page faults of a
  fresh 80 MB score buffer cost more than the softmax over it, so a kernel reuses the largest
  buffer it asked for before instead of allocating one per call.
* **Independent items may run on a pool** (:func:`run_items`): ``torch.get_num_threads()``
  Python threads, each issuing single-threaded ops, instead of torch's own threaded ops one
  item after another. Whether that pays is the caller's decision (it is a measured, per-kernel
  setting; see ``attnopt.codegen.cpu.block_sparse.PARALLEL_ITEMS``), so it is an argument here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["MAX_TILE", "run_items", "scratch"]

#: Largest score tile of the block-sparse CPU paths, in elements (16 MB of fp32): a whole head
#: at N=4096, W=512, C=128 fits, so each head is one ``baddbmm`` / softmax / ``bmm``. Fewer,
#: larger ops measured faster than cache-sized tiles here, and they suffer less when other
#: processes share the two cores (every op is an OpenMP barrier).
MAX_TILE = 4 * 1024 * 1024

_POOLS: dict[int, ThreadPoolExecutor] = {}
_THREADS_LOCK = threading.Lock()
#: Each thread's scratch buffers, freed with the thread (a serving process that starts and ends
#: worker threads does not accumulate buffers of threads that are gone).
_LOCAL = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat scratch tensor of ``numel`` elements, one per (name, dtype, device, thread).

    The contents are garbage; the caller overwrites what it reads. Two live uses need two names.
    """
    buffers: dict[tuple, torch.Tensor] = _LOCAL.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        # a normal tensor, even when the caller is in inference_mode: an inference tensor could
        # never be written again by a later call outside it
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buf
    return buf[:numel]


@contextlib.contextmanager
def _single_threaded_ops() -> Iterator[None]:
    """Make torch ops single-threaded for the duration (the item pool supplies the parallelism)."""
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def run_items(items: list[tuple], fn: Callable[..., None], *, parallel: bool) -> None:
    """Call ``fn(*item)`` for every item: on the thread pool when ``parallel`` and it pays, else in order.

    The pool is used only with at least two torch threads, at least as many items as threads,
    and from the main thread (a kernel called from a worker thread must not nest pools). Items
    must write disjoint outputs; their order of execution is unspecified.
    """
    workers = torch.get_num_threads()
    if (
        not parallel
        or workers < 2
        or len(items) < workers
        or threading.current_thread() is not threading.main_thread()
    ):
        for item in items:
            fn(*item)
        return
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="attnopt-cpu")
    # Autograd modes are thread-local: workers must run under the caller's (inference_mode and
    # no_grad included), or in-place writes into the caller's tensors fail or get recorded.
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(*item) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(*item)

    with _single_threaded_ops():
        for future in [pool.submit(run, *item) for item in items]:
            future.result()
