"""`t2i world diagnose` on the shipped kit, at a small size: the evaluator reads the renders exactly, and the probe
finds the prompt's word order in the teacher's output, which the context-free input embeddings do not hold."""

import os
import subprocess
import sys

from trainer.world.diagnose import diagnose

KIT = "service/models/miniature"


def test_the_checks_bound_the_teacher_from_outside():
    report = diagnose(KIT, scenes=24, probe_steps=300, probe_train=2000, probe_test=400)
    vae = report["vae_roundtrip"]
    assert set(vae["rendered"]["every_attribute"]) == {"single", "count", "relation", "text"}
    assert all(rate == 1.0 for rate in vae["rendered"]["every_attribute"].values())
    assert all(0.0 <= rate <= 1.0 for rate in vae["decoded"]["attributes"].values())
    output, words = report["text_probe"]["encoder_output"], report["text_probe"]["input_embeddings"]
    # which colour comes first is in the word order: about chance (1/2 of the two named) without it
    assert words["attributes"]["color"] < 0.65 < output["attributes"]["color"]
    assert output["every_attribute"] > words["every_attribute"] + 0.1


def test_binding_reads_the_colour_a_shape_word_carries_and_a_local_teacher_carries_it_whole():
    """A shape word's input embedding says nothing of the colour before it (about 1/6); the random teacher's output
    says some of it; the local-attention teacher's (`t2i world train --teacher local`) all of it."""
    from service.models.demo import build_t5_tokenizer, build_teacher
    from trainer.world.diagnose import _relation_captions, binding, embeddings
    from trainer.world.train import MAX_TOKENS, TEACHER, local_attention

    tokenizer = build_t5_tokenizer()

    def rates(encoder, words=False):
        splits = []
        for seed, n in ((1, 1500), (2, 500)):
            captions, labels = _relation_captions(seed, n)
            contextual, inputs, mask = embeddings(encoder, tokenizer, captions, MAX_TOKENS)
            splits.append((inputs if words else contextual, mask, labels))
        return binding(*splits[0], splits[1], steps=300)

    random_teacher = build_teacher(tokenizer, 0, size=TEACHER)
    words, random_rates = rates(random_teacher, words=True), rates(random_teacher)
    local = rates(local_attention(build_teacher(tokenizer, 0, size=TEACHER)))
    assert max(words.values()) < 0.35, words
    assert all(local[k] >= 0.98 and local[k] > random_rates[k] + 0.1 for k in local), (random_rates, local)


def test_the_command_names_a_missing_part_of_the_kit(tmp_path):
    run = subprocess.run([sys.executable, "-m", "service.cli", "world", "diagnose", "--kit", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "T2I_THREADS": "1"})
    assert run.returncode != 0 and "pipelines/flux/vae" in run.stderr and "--kit" in run.stderr
    bad = subprocess.run([sys.executable, "-m", "service.cli", "world", "diagnose", "--kit", KIT, "--scenes", "0"],
                         capture_output=True, text=True, env={**os.environ, "T2I_THREADS": "1"})
    assert bad.returncode != 0 and "--scenes" in bad.stderr and "at least 1" in bad.stderr
    assert "Traceback" not in bad.stderr
