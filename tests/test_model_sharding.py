"""Models larger than one GPU: the transformer layers sharded over 2 gloo processes with FSDP2 (``--shard-model``),
each process also taking its share of the batches; importance, entropy and masking equal one process's.

What this CPU test covers: the sharding itself (every layer's parameters split in two, all-gathered for the forward
and again for the backward, freed after), the head-mask gradient through the sharded layers, the padding-free
patch under FSDP, tied embeddings left whole, and the data-parallel reduction on top, on the real CLI. What only a
multi-GPU machine shows: NCCL all-gathers and their overlap with compute, the memory per GPU, and the Triton
kernels under FSDP (docs/large-models.md)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_models import save_tiny_gpt2, sentences  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DRIVER = textwrap.dedent('''
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from fastbertology.cli import main

    out = sys.argv[1]
    codes = {}
    for name in ("llama", "gpt2"):
        common = ["--model", f"{out}/{name}", "--data", f"{out}/data.txt", "--batch-size", "2", "--max-seq-length",
                  "16", "--device", "cpu", "--no-progress", "--shard-model"]
        codes[name] = main(["importance", *common, "--output-dir", f"{out}/dist/{name}"])
        codes[name + "_mask"] = main(["mask", *common, "--output-dir", f"{out}/dist/{name}_mask",
                                      "--masking-amount", "0.25"])

    # the library: every layer's parameters are split in two, the rest whole
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from fastbertology import patch
    from fastbertology.model_sharding import shard_model
    model = AutoModelForCausalLM.from_pretrained(f"{out}/gpt2").eval()
    full = {name: p.numel() for name, p in model.named_parameters()}
    patch(model)
    shard_model(model, torch.device("cpu"))
    local = {name: (type(p).__name__, p.to_local().numel() if hasattr(p, "to_local") else p.numel())
             for name, p in model.named_parameters()}
    tied = model.lm_head.weight is model.transformer.wte.weight
    with open(f"{out}/dist/library-{dist.get_rank()}.json", "w") as file:
        json.dump({"codes": codes, "full": full, "local": local, "tied": tied}, file)
''')


def save_tiny_llama(directory, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)


@pytest.fixture(scope="module")
def sharded_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    save_tiny_gpt2(root / "gpt2")
    save_tiny_llama(root / "llama", root / "gpt2")
    (root / "data.txt").write_text("\n".join(sentences(40, seed=5)), encoding="utf-8")
    (root / "driver.py").write_text(DRIVER)
    (root / "dist").mkdir()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    environment.pop("WORLD_SIZE", None)
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(root / "driver.py"), str(root)], env=environment, capture_output=True, text=True,
                            timeout=600)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-5000:]
    from fastbertology.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name in ("llama", "gpt2"):
        common = ["--model", str(root / name), "--data", str(root / "data.txt"), "--batch-size", "2",
                  "--max-seq-length", "16", "--device", "cpu", "--no-progress"]
        assert main(["importance", *common, "--output-dir", str(root / "single" / name)]) == 0
        assert main(["mask", *common, "--output-dir", str(root / "single" / f"{name}_mask"), "--masking-amount",
                     "0.25"]) == 0
    torch.set_num_threads(threads)
    return root


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sharded_importance_equals_one_process(sharded_outputs, name):
    dist, single = sharded_outputs / "dist" / name, sharded_outputs / "single" / name
    for file in ("head_importance.npy", "attn_entropy.npy", "attn_max_prob.npy"):
        np.testing.assert_allclose(np.load(dist / file), np.load(single / file), rtol=1e-9, atol=1e-12, err_msg=file)
    got = json.loads((dist / "summary.json").read_text())
    expected = json.loads((single / "summary.json").read_text())
    assert got["importance"]["tokens"] == expected["importance"]["tokens"]
    assert got["importance"]["metric"] == pytest.approx(expected["importance"]["metric"], rel=1e-12)
    assert "sharded over 2 processes (FSDP2)" in got["setup"]["device"]
    dist_mask, single_mask = (sharded_outputs / part / f"{name}_mask" for part in ("dist", "single"))
    assert np.array_equal(np.load(dist_mask / "head_mask.npy"), np.load(single_mask / "head_mask.npy"))


def test_layers_are_split_over_the_processes_and_the_rest_is_whole(sharded_outputs):
    ranks = [json.loads((sharded_outputs / "dist" / f"library-{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        assert set(result["codes"].values()) == {0}, result["codes"]
        assert result["tied"]
        for name, (kind, local) in result["local"].items():
            if ".h." in name:  # a transformer layer's parameter: half of it here (the first rank takes the odd one)
                assert kind == "DTensor" and local in (result["full"][name] // 2, (result["full"][name] + 1) // 2), name
            else:
                assert kind == "Parameter" and local == result["full"][name], name


def test_shard_model_needs_torchrun(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastbertology.model_sharding import shard_model

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="start it with torchrun --nproc-per-node N"):
        shard_model(model, torch.device("cpu"))
    from fastbertology.cli import main

    save_tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "data.txt").write_text("the cat sat on the mat", encoding="utf-8")
    assert main(["importance", "--model", str(tmp_path / "gpt2"), "--data", str(tmp_path / "data.txt"),
                 "--shard-model", "--no-progress", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--shard-model shards the model over the processes of a torchrun job" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
