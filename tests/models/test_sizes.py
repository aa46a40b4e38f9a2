"""Real-size architectures on the meta device: counts without allocating."""

import resource

from service.models.sizes import encoder_row, pipeline_row, reference_rows


def test_reference_counts_match_the_published_sizes():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = {r.name: r for r in reference_rows()}
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert 4.70e9 < rows["t5-xxl"].params < 4.80e9  # the T5-XXL encoder: ~4.76 B
    assert 1.05e8 < rows["t5-base"].params < 1.15e8  # T5-Base encoder: ~110 M
    assert rows["t5-xxl"].params / rows["t5-base"].params > 35
    assert 11.5e9 < rows["flux.1"].params < 12.5e9  # FLUX.1 transformer: ~12 B
    assert rows["t5-base+proj4096"].width == 4096
    assert rows["t5-xxl"].bytes == 2 * rows["t5-xxl"].params  # bf16
    assert grown_mib < 1024, f"meta-device counting allocated {grown_mib:.0f} MiB"


def test_registry_rows_are_read_from_configs(registry):
    teacher = encoder_row(registry.encoder("t5-xxl"))
    student = encoder_row(registry.encoder("t5-small"))
    assert teacher.width == student.width == 64
    assert teacher.params > 5 * student.params
    assert teacher.bytes == 4 * teacher.params and teacher.dtype == "float32" and teacher.device == "cpu"
    flux = pipeline_row(registry.pipeline("flux"))
    assert flux.params and flux.width == 64
