"""Per-job peak memory on the CPU: the process's peak RSS, reset before each job."""

import numpy as np
import torch

from service.worker.memory import peak_bytes, reset_peak

CPU = torch.device("cpu")


def test_the_peak_is_reset_per_job_and_follows_what_the_job_allocates():
    big = np.ones(256 * 2**20 // 8)  # 256 MiB, touched
    del big
    lifetime = peak_bytes(CPU)
    reset_peak(CPU)
    after_reset = peak_bytes(CPU)
    assert after_reset < lifetime - 200 * 2**20, (lifetime, after_reset)  # the old peak is forgotten
    small = np.ones(64 * 2**20 // 8)
    del small
    job_peak = peak_bytes(CPU)
    assert after_reset + 50 * 2**20 < job_peak < lifetime, (after_reset, job_peak, lifetime)
