"""GPU cards' datasheet figures, and the one definition of MFU that the training metrics, `vincie plan` and
bench/gpu report.

    MFU = model FLOPs per second of one GPU / the card's datasheet dense peak at the run's precision

Model FLOPs are vincie.model.flops' analytic count (allowed attention pairs only, no recomputation). The peak is
the datasheet's dense figure: NVIDIA states tensor-core peaks with 2:4 structured sparsity, which no dense matrix
product reaches, so the table holds half of those. A measured matmul rate is not the denominator: it changes with
the driver, the library and the clocks; bench/gpu prints its ratio as a second figure, named apart from MFU.

The precision is train.precision's: "bf16" runs are stated against the bf16 tensor-core peak, and so are FP8 runs
(model.fp8 needs train.precision=bf16). Only the layers' projections run in FP8 (attention, the adaLN, the
embedders and the final layer stay bf16), so no FP8 peak bounds the model's work, and against the bf16 peak an
FP8 run's MFU compares directly with the same run without FP8: FP8's gain shows as a higher MFU. That is the
common convention (PaLM's MFU; torchtitan states MFU against the bf16 peak whatever it trains in, float8 too);
MosaicML's Composer takes the FP8 peak for FP8 runs instead, which is the table's "fp8" entry. "fp32" runs (no
autocast; PyTorch leaves TF32 off and vincie does not turn it on) are stated against the fp32 non-tensor peak.

Imports nothing, so that bench/gpu and every layer of vincie can use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Card:
    """One GPU card: dense peaks per precision, and what `vincie plan` assumes of a node built from it."""
    name: str  # as metrics.gpu and `vincie plan --gpu` name it
    dense_tflops: dict[str, float] = field(hash=False)  # precision -> datasheet dense peak, TFLOP/s
    memory_gib: float | None = None  # as nvidia-smi reports it
    nvlink_gbs: float | None = None  # per GPU, per direction
    network_gbs: float | None = None  # per GPU, between nodes

    def with_peak(self, precision: str, tflops: float) -> Card:
        """The same card with `tflops` as its dense peak at `precision` (an explicit override)."""
        return replace(self, dense_tflops={**self.dense_tflops, precision: tflops})


# Dense peaks, TFLOP/s per GPU, from NVIDIA's datasheets (SXM parts). Tensor-core figures there are "with sparsity"
# except the A100's, which states both; the dense figure is half the sparse one. fp32: CUDA cores, no tensor cores.
# - A100 SXM4 80GB (NVIDIA A100 Tensor Core GPU datasheet): FP32 19.5, BF16 Tensor Core 312 (624 sparse); no FP8.
# - H100 SXM (NVIDIA H100 Tensor Core GPU datasheet): FP32 67, BF16 Tensor Core 1,979 sparse, FP8 3,958 sparse.
# - H200 SXM (NVIDIA H200 Tensor Core GPU datasheet): the H100 SXM's figures (the same GH100 die).
# - B200 (NVIDIA HGX B200 specifications, per GPU): FP32 75, FP16/BF16 Tensor Core 4.5 PFLOPS sparse, FP8/FP6
#   Tensor Core 9 PFLOPS sparse.
# Memory as nvidia-smi reports it (81920, 81559, 143771 and 183359 MiB); NVLink 3 (A100) 600 GB/s, NVLink 4
# (H100, H200) 900 GB/s, NVLink 5 (B200) 1.8 TB/s, both directions together; one 200 Gb/s (A100) or 400 Gb/s
# InfiniBand port per GPU, as DGX systems of each generation have.
CARDS = {card.name: card for card in (
    Card("a100", {"fp32": 19.5, "bf16": 312.0}, 80.0, 300.0, 25.0),
    Card("h100", {"fp32": 67.0, "bf16": 989.5, "fp8": 1979.0}, 79.6, 450.0, 50.0),
    Card("h200", {"fp32": 67.0, "bf16": 989.5, "fp8": 1979.0}, 140.4, 450.0, 50.0),
    Card("b200", {"fp32": 75.0, "bf16": 2250.0, "fp8": 4500.0}, 179.1, 900.0, 50.0),
)}

# torch.cuda.get_device_name() of each card, e.g. "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200",
# "NVIDIA B200". The A100's PCIe parts have the SXM part's peaks; the H100 and H200 PCIe and NVL parts have lower
# ones and the superchips (GH200, GB200) other ones, so those names match no card.
DEVICE_NAMES = {"a100": r"\bA100\b", "h100": r"\bH100\b(?!.*(PCIe|NVL))", "h200": r"\bH200\b(?!.*NVL)",
                "b200": r"\bB200\b"}


def detect(device_name: str) -> Card | None:
    """The card a CUDA device name names; None for any other device."""
    return next((CARDS[name] for name, pattern in DEVICE_NAMES.items()
                 if re.search(pattern, device_name, re.IGNORECASE)), None)


def resolve(gpu: str, peak_tflops: float, precision: str, device_name: str | None) -> Card | None:
    """The card a run's MFU is stated against: `gpu` names a card of CARDS, or "auto" detects it from the device's
    name (None: not a CUDA device). `peak_tflops` > 0 replaces its peak at `precision`, and is the one way to
    state MFU on a card the table lacks. None: no MFU (the CPU, an unlisted card without `peak_tflops`)."""
    card = CARDS[gpu] if gpu != "auto" else detect(device_name) if device_name else None
    if peak_tflops > 0:
        card = (card or Card(device_name or "cpu", {})).with_peak(precision, peak_tflops)
    return card


def mfu(model_flops_per_s: float, card: Card, precision: str) -> float:
    """Model FLOPs utilisation of one GPU: its model FLOPs per second over `card`'s dense peak at `precision`
    (train.precision: "bf16" for FP8 runs too, see above)."""
    return model_flops_per_s / (card.dense_tflops[precision] * 1e12)
