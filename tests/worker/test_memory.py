"""Per-job peak memory on the CPU: the process's peak RSS, reset before each job."""

import mmap

import torch

from service.worker.memory import peak_bytes, reset_peak

CPU = torch.device("cpu")


def _touch(n_bytes: int) -> None:
    """Map fresh anonymous pages, write every one of them, unmap. Fresh pages always raise the RSS, where a large
    array from malloc may reuse pages a long test session already holds (seen once in a full-suite run: a 64 MiB
    array left the peak where the reset put it)."""
    pages = mmap.mmap(-1, n_bytes)
    for offset in range(0, n_bytes, mmap.PAGESIZE):  # one byte a page: no n_bytes temporary beside the mapping
        pages[offset] = 1
    pages.close()


def test_the_peak_is_reset_per_job_and_follows_what_the_job_allocates():
    _touch(256 * 2**20)
    lifetime = peak_bytes(CPU)
    reset_peak(CPU)
    after_reset = peak_bytes(CPU)
    assert after_reset < lifetime - 200 * 2**20, (lifetime, after_reset)  # the old peak is forgotten
    _touch(64 * 2**20)
    job_peak = peak_bytes(CPU)
    assert after_reset + 50 * 2**20 < job_peak < lifetime, (after_reset, job_peak, lifetime)
