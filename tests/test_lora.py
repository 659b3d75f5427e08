"""train.lora: low-rank adapters on the projections, the rest frozen, merged by `vincie export` (docs/release.md).
Their tensor-parallel split against one process is in tests/test_parallel.py."""

import pytest
import torch

from vincie.config import ConfigError, load_config
from vincie.data.order import SamplerState
from vincie.inference.export import load_model
from vincie.training.parallel import init_distributed
from vincie.training.trainer import Trainer

from conftest import run_vincie
from helpers import make_data, write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "train", sessions=8)


def test_only_the_adapters_train_and_the_export_is_the_merged_model(tmp_path, data):
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run", data),
                      ["train.lr=0.01", "train.warmup_steps=1", "train.steps=3", "train.batch_size=2",
                       "data.workers=0", "train.lora.rank=4", "train.lora.alpha=8", "train.checkpoint_every=3"])
    trainer = Trainer(cfg, init_distributed())
    torch.manual_seed(1)
    with torch.no_grad():  # a "trained" base: off adaLN-Zero, so that the adapters' outputs reach the loss
        for param in trainer.model.parameters():
            param.normal_(0.0, 0.05)
    trainer.ema.shadow = [{n: p.detach().clone() for n, p in trainer.model.named_parameters()}]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    adapters = {n for n in before if n.endswith((".lora_a", ".lora_b"))}
    assert adapters and {n for n, p in trainer.model.named_parameters() if p.requires_grad} == adapters
    for _ in range(3):
        trainer.train_step()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]) != (name in adapters), name  # adapters moved, nothing else
    trainer.save()

    out = tmp_path / "model"
    exported = run_vincie("export", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--weights", "raw")
    assert exported.returncode == 0, exported.stderr
    _, merged, _, _ = load_model(str(out), torch.device("cpu"))
    assert not any("lora" in name for name in merged.state_dict())
    trainer.loader.seek(SamplerState())
    batch = trainer.make_batch()
    with torch.no_grad():
        adapted = trainer.model(batch.inputs)
        torch.testing.assert_close(merged(batch.inputs), adapted, rtol=1e-4, atol=1e-5)
        # the comparison is not empty: without the adapters the base model gives something else
        base = load_config(str(tmp_path / "c.yaml"))
        plain = Trainer(base, init_distributed()).model
        plain.load_state_dict({n: p for n, p in trainer.model.state_dict().items() if "lora" not in n})
        assert (plain(batch.inputs) - adapted).abs().max() > 1e-3


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match=r"train.lora.targets' must be a non-empty list of linear_qkv, linear_proj, "
                                          r"linear_fc1, linear_fc2, got \['linear_out'\]"):
        load_config("tiny", ["train.lora.rank=4", "train.lora.targets=[linear_out]"])
    with pytest.raises(ConfigError, match="train.lora.rank' must be >= 0"):
        load_config("tiny", ["train.lora.rank=-1"])
