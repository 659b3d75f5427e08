"""The layer spec (local vs Transformer Engine) and FP8 settings: selection, the one-line errors where TE or FP8
is not available, the FP8 GEMM dimension check, and the row padding of the FP8 linears. Where Transformer Engine is
installed (a GPU machine) the TE spec builds and predicts like the local one; where it is not, asking for it is one
line. FP8 speed is measured by bench/gpu/run.sh."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from vincie.config import ConfigError, have_transformer_engine, load_config
from vincie.config import rules as config_module
from vincie.model.megatron_layers import check_fp8_hardware, layer_spec, rows_aligned
from vincie.model.mmdit import Linear

from helpers import MICRO_OVERRIDES, micro_batch


def one_line_error(overrides, have_te: bool, monkeypatch) -> str:
    monkeypatch.setattr(config_module, "have_transformer_engine", lambda: have_te)
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides", [["model.spec=te"], ["model.spec=te", "model.fp8=e4m3",
                                                            "train.precision=bf16"]])
def test_asking_for_te_or_fp8_without_transformer_engine_stops_at_validation(overrides, monkeypatch):
    message = one_line_error(overrides, False, monkeypatch)
    assert "Transformer Engine" in message and "pip install" in message and "transformer_engine" in message


@pytest.mark.skipif(have_transformer_engine(), reason="Transformer Engine is installed: the TE spec is built instead")
def test_asking_for_te_where_it_is_not_installed_is_one_line():
    """The real check (no monkeypatch): at validation, and when the layers build past it."""
    with pytest.raises(ConfigError, match="model.spec.*Transformer Engine") as info:
        load_config("tiny", ["model.spec=te"])
    assert "\n" not in str(info.value)
    te = load_config("tiny").model
    te.spec = "te"
    with pytest.raises(ConfigError, match="Transformer Engine is not installed: pip install"):
        layer_spec(te)


def test_te_spec_builds_and_predicts_like_the_local_spec():
    """The micro model with TE linears and with megatron-core's local ones, the same random weights (copied by
    name: the TE linears keep the parameter names), on the same batch. TE's GEMMs may run fp32 inputs as TF32
    (10-bit mantissa, ~1e-3 relative per product): 1e-2 relative over the two layers."""
    pytest.importorskip("transformer_engine")
    if not torch.cuda.is_available():
        pytest.skip("Transformer Engine's layers run on a GPU")
    from vincie.model.batch import collate
    from vincie.model.components import build_components
    from vincie.training.parallel import init_distributed

    init_distributed()
    cfg, local, samples = micro_batch(2, **{"model.attention_backend": "sdpa"})
    te_cfg = load_config("tiny", ["data.resolution=32", *MICRO_OVERRIDES, "model.attention_backend=sdpa",
                                  "model.spec=te"])
    device = torch.device("cuda")
    te, _, _ = build_components(te_cfg, device)
    assert type(te.dit.layers["0"].latent.linear_qkv).__name__ == "RowsAlignedTEColumnParallelLinear"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in local.parameters():  # off adaLN-Zero: every layer acts
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        weights = dict(local.named_parameters())
        assert {name for name, _ in te.named_parameters()} == weights.keys()
        for name, param in te.named_parameters():
            param.copy_(weights[name])
        local.to(device)
        batch = collate(samples, device, cfg.model.text_dim)
        expected, got = local(batch.inputs), te(batch.inputs)
    assert got.shape == expected.shape and expected.abs().mean() > 0.01
    assert float((got - expected).norm() / expected.norm()) <= 1e-2


def test_fp8_needs_the_te_spec_and_bf16(monkeypatch):
    assert "model.spec=te" in one_line_error(["model.fp8=hybrid", "train.precision=bf16"], True, monkeypatch)
    assert "train.precision=bf16" in one_line_error(["model.spec=te", "model.fp8=hybrid"], True, monkeypatch)


def test_fp8_gemm_dimensions_must_be_multiples_of_16_or_32_for_mxfp8(monkeypatch):
    fp8 = ["model.spec=te", "model.fp8=e4m3", "train.precision=bf16"]
    monkeypatch.setattr(config_module, "have_transformer_engine", lambda: True)
    assert load_config("tiny", fp8).model.fp8 == "e4m3"  # hidden 64, MLP 192: aligned
    assert load_config("tiny", [*fp8, "model.hidden_size=208", "model.num_heads=2", "model.text_dim=208"])
    message = one_line_error([*fp8, "model.hidden_size=136", "model.num_heads=1", "model.text_dim=136"], True,
                             monkeypatch)
    assert "multiple of 16" in message and "linear_qkv is 136 x 408" in message
    message = one_line_error([*fp8, "model.hidden_size=208", "model.num_heads=2", "model.text_dim=208",
                              "model.fp8_recipe=mxfp8"], True, monkeypatch)
    assert "multiple of 32" in message and "208" in message
    # per tensor-parallel rank: 3 x 208 / 2 = 312 is not a multiple of 16
    message = one_line_error([*fp8, "model.hidden_size=208", "model.num_heads=2", "model.text_dim=208",
                              "parallel.tensor=2"], True, monkeypatch)
    assert "linear_qkv is 208 x 312" in message and "parallel.tensor 2" in message


def test_recompute_with_delayed_fp8_scaling_is_refused(monkeypatch):
    fp8 = ["model.spec=te", "model.fp8=e4m3", "train.precision=bf16", "train.recompute=full"]
    monkeypatch.setattr(config_module, "have_transformer_engine", lambda: True)
    assert load_config("tiny", fp8).train.recompute == "full"  # tensorwise (current) scaling: no history
    message = one_line_error([*fp8, "model.fp8_recipe=delayed"], True, monkeypatch)
    assert "train.recompute" in message and "amax" in message


def test_the_local_spec_is_megatron_cores_parallel_linears():
    local = layer_spec(load_config("tiny").model)
    assert (local.linear_qkv, local.linear_proj, local.linear_fc1, local.linear_fc2) == \
        (ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear, RowParallelLinear)


def test_fp8_recipes_by_gpu_generation():
    for recipe in ("delayed", "tensorwise", "blockwise"):
        check_fp8_hardware(recipe, (9, 0))  # H100 / H200
    check_fp8_hardware("mxfp8", (10, 0))  # B200
    with pytest.raises(ConfigError, match=r"needs a GPU of compute capability 10.0.*9.0.*tensorwise or blockwise"):
        check_fp8_hardware("mxfp8", (9, 0))
    with pytest.raises(ConfigError, match=r"8.0 \(use model.fp8=off\)"):
        check_fp8_hardware("delayed", (8, 0))  # A100: no FP8 tensor cores


def test_rows_aligned_pads_tokens_and_gives_the_same_outputs_and_gradients():
    """The padding wrapper around a linear with the same calling convention (TE's is not installed here)."""
    seen = []

    class Recording(Linear):  # the rows the GEMM sees
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    torch.manual_seed(0)
    plain, padded = Linear(32, 48), rows_aligned(Recording, 16)(32, 48)
    padded.load_state_dict(plain.state_dict())
    assert [n for n, _ in padded.named_parameters()] == ["weight", "bias"]
    x = torch.randn(19, 32, requires_grad=True)
    out, bias = padded(x)
    assert bias is None and out.shape == (19, 48) and seen == [32]
    out.square().sum().backward()
    grad_x, grad_w = x.grad.clone(), padded.weight.grad.clone()
    x.grad = None
    plain(x)[0].square().sum().backward()
    torch.testing.assert_close(out, plain(x)[0])
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, plain.weight.grad)
