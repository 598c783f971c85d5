"""bfloat16 on the CPU (--amp bf16, --eval_amp bf16): training steps that learn, descriptors that retrieve as fp32's,
the frozen inference path in bf16, and the one line that says whether this CPU has bfloat16 units."""

import logging

import numpy as np
import pytest
import torch

import parser
from benchmarks.gpu_checks import check_amp_step
from core import cpu
from datasets.test_dataset import TestDataset
from evaluation import descriptors
from model import network
from retrieval import faiss_indexes


def test_bf16_training_steps_on_the_cpu_are_finite_and_move_the_weights():
    """ResNet-18 + GeM + CosFace, three Adam steps in bf16 autocast: the network computes in bf16 (not silently in
    fp32), the losses are finite and both the backbone and the head are updated."""
    check_amp_step("cpu", "bf16")


def test_the_margin_head_computes_in_fp32_under_autocast():
    """s * cos: a cosine rounded to bf16 would move the logits by up to s * 2**-8; the head computes in fp32."""
    torch.manual_seed(0)
    head = __import__("cosface_loss").get_margin_head("cosface", 64, 10)
    inputs, labels = torch.randn(4, 64), torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(inputs.bfloat16(), labels)
    assert logits.dtype == torch.float32
    reference = 30 * (torch.nn.functional.normalize(inputs.bfloat16().double()) @
                      torch.nn.functional.normalize(head.weight.double()).T)
    reference[torch.arange(4), labels] -= 30 * 0.4
    torch.testing.assert_close(logits.double(), reference, atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def demo_model_and_set(synthetic_dataset):
    """A ResNet-18 + GeM (random weights, seed 0) and the demo data's test set."""
    args = parser.parse_arguments("eval", ["--test_set_folder", "-", "--backbone", "resnet18", "--pretrained", "none"])
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(**parser.model_options(args)).eval()
    return model, TestDataset(f"{synthetic_dataset}/test")


def test_eval_amp_bf16_descriptors_are_fp32_ones_and_retrieve_the_same_top1(demo_model_and_set):
    model, dataset = demo_model_and_set
    fp32 = descriptors.compute_descriptors(model, dataset, "cpu", amp="none", channels_last=True)
    bf16 = descriptors.compute_descriptors(model, dataset, "cpu", amp="bf16", channels_last=True)
    assert bf16.dtype == np.float32  # FAISS gets fp32 whatever the network computed in
    cosines = np.sum(fp32 * bf16, axis=1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosines.min() > 0.99, cosines.min()
    assert not np.array_equal(fp32, bf16)  # bf16 did act
    top1 = [faiss_indexes.knn_search(d[:dataset.database_num], d[dataset.database_num:], 1)[:, 0]
            for d in (fp32, bf16)]
    np.testing.assert_array_equal(top1[0], top1[1])


def test_the_frozen_cpu_path_runs_in_bf16(demo_model_and_set):
    """FrozenForCpu traced in bf16 autocast: the frozen model is kept (it agrees with the eager bf16 one) and its
    descriptors are the fp32 model's to a cosine above 0.99."""
    model, _ = demo_model_and_set
    images = torch.rand(4, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    frozen = descriptors.FrozenForCpu(model, images, amp="bf16")
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = frozen(images)
        reference = model(images)
    assert frozen.frozen is not None
    assert output.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(output.float(), reference).min() > 0.99


@pytest.mark.parametrize("cpuinfo, units", [
    ("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_bf16 amx_tile\n", ("amx_bf16", "avx512_bf16")),
    ("processor : 0\nflags : fpu sse avx2 avx512f\n", ()),
    ("processor : 0\nFeatures : fp asimd bf16 i8mm\n", ("bf16",)),
])
def test_bf16_units_are_read_from_cpuinfo(tmp_path, cpuinfo, units):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu.bf16_units(str(path)) == units


def test_the_start_of_a_cpu_run_says_whether_it_has_bf16_units(monkeypatch):
    """One line among the run's notes (tests/test_layout_and_errors.py checks that train.py prints it once): an
    information where the CPU has units, a warning naming the cost where --amp bf16 would be emulated."""
    notes = {}
    for units in [(), ("avx512_bf16",)]:
        monkeypatch.setattr(cpu, "bf16_units", lambda path=None: units)
        for amp in ("none", "bf16"):
            args = parser.parse_arguments("train", ["--dataset_folder", "-", "--device", "cpu", "--amp", amp])
            [notes[units, amp]] = [note for note in parser.implicit_settings(args) if note[1].startswith("CPU: ")]
    assert notes[(), "bf16"][0] == logging.WARNING
    assert notes[(), "bf16"][1].startswith("CPU: no bfloat16 units (no avx512_bf16, amx_bf16): --amp bf16 is "
                                           "emulated here, several times slower than fp32")
    assert notes[(), "none"] == (logging.INFO, "CPU: no bfloat16 units (no avx512_bf16, amx_bf16): fp32 is the "
                                               "fast precision here")
    assert notes[("avx512_bf16",), "bf16"][0] == logging.INFO
    assert notes[("avx512_bf16",), "bf16"][1].startswith("CPU: computes bfloat16 natively (avx512_bf16): --amp bf16 "
                                                         "runs the network in bf16 autocast")
    assert notes[("avx512_bf16",), "none"][1].startswith("CPU: computes bfloat16 natively (avx512_bf16): --amp bf16 "
                                                         "/ --eval_amp bf16 can run")
    cuda = parser.parse_arguments("train", ["--dataset_folder", "-", "--device", "cuda", "--amp", "bf16"])
    assert not [note for _, note in parser.implicit_settings(cuda) if note.startswith("CPU: ")]
