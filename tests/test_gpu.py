"""The same code on a CUDA device: extraction, training and the spliced loss.

Skipped where no GPU is present (CI has none); run on a machine with one to check the device
paths: ``pytest tests/test_gpu.py``. The data-parallel test runs two torchrun ranks on one GPU
(gloo, CUDA tensors staged through the host; NCCL needs a GPU per rank).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sae_nb
from sae_nb.training.evaluate import ce_metrics
from sae_nb.training.trainer import train_dictionary

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_extraction_on_gpu_matches_cpu(model_dirs, corpus_dir, tmp_path):
    stores = {}
    for device in ("cpu", "cuda"):
        model = sae_nb.load_model(str(model_dirs["llama"]), device=device)
        stores[device] = sae_nb.extract_activations(
            model, tmp_path / device, sites=["resid_out_layer1", "mlp_in_layer2"],
            corpus=str(corpus_dir), n_tokens=512, ctx_len=32, batch_size=4, dtype="float32",
            progress=False)
    for site in ("resid_out_layer1", "mlp_in_layer2"):
        cpu, gpu = stores["cpu"][site], stores["cuda"][site]
        assert len(cpu) == len(gpu) > 0
        np.testing.assert_allclose(gpu[:], cpu[:], rtol=1e-3, atol=1e-3)
        assert np.array_equal(gpu.index(), cpu.index())


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "standard", "jumprelu"])
@pytest.mark.parametrize("autocast", [False, True])
def test_training_runs_on_cuda(arch, autocast):
    g = torch.Generator().manual_seed(0)
    x = ((torch.rand(4096, 48, generator=g) * (torch.rand(4096, 48, generator=g) < 0.1))
         @ torch.randn(48, 32, generator=g))
    batches = (b for _ in range(20) for b in x.split(256))
    res = train_dictionary(batches, architecture=arch, d_sae=128, k=8, total_tokens=256 * 150,
                           lr=3e-3, l1_coefficient=0.05, device="cuda", autocast=autocast,
                           progress=False)
    assert res.dictionary.W_enc.is_cuda
    assert res.log["fvu"].iloc[-1] < res.log["fvu"].iloc[0]


def test_spliced_loss_on_cuda(model_dirs):
    model = sae_nb.load_model(str(model_dirs["llama"]), device="cuda")
    tokens = torch.randint(0, 200, (4, 16))
    m = ce_metrics(torch.nn.Identity(), model, "resid_out_layer1", tokens)
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], rel=1e-5)
    assert m["ce_zero_ablation"] > m["ce_clean"]


def test_two_ranks_on_one_gpu_train_the_dictionary_of_one_process(tmp_path):
    """torchrun with 2 ranks on the one GPU: the same dictionary as one CUDA process on the same
    global batches (fp32), both ranks identical; bf16 autocast trains too."""
    from test_distributed import data, global_batches, load, make_store, settings, torchrun

    make_store(tmp_path / "store", data())
    done = torchrun("gpu", tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    store = sae_nb.ActivationStore(tmp_path / "store")
    for arch in ("topk", "batchtopk"):
        for autocast in (False, True):
            ranks = [load(tmp_path, f"gpu_{arch}_{autocast}", r) for r in (0, 1)]
            for key, value in ranks[0]["state"].items():
                assert torch.equal(value, ranks[1]["state"][key]), f"{arch}: ranks differ in {key}"
            assert ranks[0]["state"]["W_enc"].is_cuda
            fvu = ranks[0]["log"]["fvu"]
            assert fvu[-1] < fvu[0]
            if not autocast:
                one = train_dictionary(global_batches(store), **settings(arch, device="cuda"))
                for key, value in one.dictionary.state_dict().items():
                    torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4,
                                               atol=1e-4, msg=key)
