"""Speed as a hardware-relative number: model FLOPs, the device's peak, MFU (nanoGPT's `estimate_mfu`).

What is counted: the multiply-adds (x 2) of the conv and linear layers (`model.flops_per_image`);
pooling, ReLU, dropout, the loss and the per-batch resize are left out. A training image costs 3x its
forward pass (forward, plus a backward pass of about twice the forward: the usual convention; the
first conv's input gradient, which is never computed, is counted anyway: about 1%). A test image costs
1x. These are direct-convolution FLOPs: cuDNN's Winograd and FFT algorithms do fewer, so a figure can
exceed what the arithmetic alone allows (the book's 4,171 examples/s on a V100 is 23.5 TFLOP/s by this
count, above the V100's 15.7 fp32 peak).

MFU is measured against one yardstick per device, whatever precision the pipeline runs in: its dense
bf16 tensor-core peak from NVIDIA's data sheets (fp32 where the chip has no bf16), or, for a device
not in the table and on the CPU, the best matmul throughput measured here.
"""

from __future__ import annotations

import platform
import re
import time

import torch

from alexnet.training.model import flops_per_image

# Dense (no sparsity) TFLOP/s from NVIDIA's data sheets: (name in torch.cuda.get_device_name, label,
# bf16 tensor core, fp32). First match wins.
PEAKS = [
    ("GH200", "GH200", 989.0, 67.0),
    ("H200 NVL", "H200 NVL", 835.0, 60.0),
    ("H200", "H200 SXM", 989.0, 67.0),
    ("H100 NVL", "H100 NVL", 835.0, 60.0),
    ("H100 PCIe", "H100 PCIe", 756.0, 51.0),
    ("H100", "H100 SXM", 989.0, 67.0),     # "NVIDIA H100 80GB HBM3"
    ("A100", "A100", 312.0, 19.5),
    ("L40S", "L40S", 362.0, 91.6),
    ("L4", "L4", 121.0, 30.3),
    ("A10", "A10", 125.0, 31.2),
    ("V100-PCIE", "V100 PCIe", None, 14.0),  # no bf16 (Volta)
    ("V100", "V100 SXM2", None, 15.7),
    ("T4", "T4", None, 8.1),                 # no bf16 (Turing)
]


def device_name(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3"; for the CPU, its model name where Linux tells it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or device.type


def known_peak(name: str) -> dict | None:
    """The table's row for a CUDA device name (whole words: "A10" is not "A10G"), or None."""
    for key, label, bf16, fp32 in PEAKS:
        if re.search(rf"\b{re.escape(key)}\b", name, re.IGNORECASE):
            return {"label": label, "bf16_tflops": bf16, "fp32_tflops": fp32}
    return None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 0, trials: int = 5) -> float:
    """The best of `trials` timings of square matmuls (n = 8192 on CUDA, 1024 on the CPU), in TFLOP/s."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(reps):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        return time.perf_counter() - t0

    seconds(1)  # library start-up, outside the timing
    reps = max(1, min(100, int(0.1 / seconds(1))))  # about 0.1 s a trial
    return max(2 * n**3 * reps / seconds(reps) for _ in range(trials)) / 1e12


def device_peak(device: torch.device) -> dict:
    """The MFU yardstick: {"tflops", "source", ...} from the table, else a measured matmul peak (bf16
    on a CUDA GPU that has it, fp32 on the CPU and older GPUs). A measured peak is recorded always."""
    name = device_name(device)
    row = known_peak(name) if device.type == "cuda" else None
    bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = {"device": name, "measured_dtype": str(dtype).removeprefix("torch."),
            "measured_matmul_tflops": measure_matmul_tflops(device, dtype)}
    if row is not None:
        used = row["bf16_tflops"] or row["fp32_tflops"]
        return {**peak, **row, "tflops": used, "source": f"{row['label']} data sheet, dense "
                + ("bf16" if row["bf16_tflops"] else "fp32")}
    return {**peak, "tflops": peak["measured_matmul_tflops"], "source": f"measured {peak['measured_dtype']} matmul"}


def training_flops(resize: int, train_examples: int, test_examples: int = 0) -> float:
    """FLOPs of training on `train_examples` and evaluating `test_examples` (see the module docstring)."""
    forward = flops_per_image(resize)
    return 3 * forward * train_examples + forward * test_examples
