"""The layer spec (local vs Transformer Engine) and FP8 settings: selection, the one-line errors where TE or FP8
is not available, the FP8 GEMM dimension check, and the row padding of the FP8 linears. Transformer Engine is not
installed here (CI has no GPU): what needs it runs in bench/gpu/run.sh."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from vincie.config import ConfigError, load_config
from vincie.config import rules as config_module
from vincie.model.megatron_layers import check_fp8_hardware, layer_spec, rows_aligned
from vincie.model.mmdit import Linear


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


def test_transformer_engine_is_not_installed_here_so_the_real_check_says_so():
    assert not config_module.have_transformer_engine()
    with pytest.raises(ConfigError, match="model.spec.*Transformer Engine"):
        load_config("tiny", ["model.spec=te"])


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


def test_spec_selection():
    local = layer_spec(load_config("tiny").model)
    assert (local.linear_qkv, local.linear_proj, local.linear_fc1, local.linear_fc2) == \
        (ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear, RowParallelLinear)
    te = load_config("tiny").model
    te.spec = "te"  # past validation (as on a machine with TE), then TE's absence is caught when the layers build
    with pytest.raises(ConfigError, match="Transformer Engine is not installed: pip install"):
        layer_spec(te)


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
