"""Plain settings types shared by the model cards and the inference code.

Kept free of torch and MONAI so that reading model cards (``volseg models``, the Slicer panel's
model list) works before PyTorch is installed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InferenceOptions:
    """Sliding-window settings, in MONAI ``sliding_window_inference`` terms.

    ``mode`` is MONAI's blending (``"constant"``, ``"gaussian"``) or ``"nnunet"``: nnU-Net v1's
    tiling, Gaussian, padding and per-window mirroring (:mod:`volseg.inference.nnunet`), where
    ``overlap`` is ``1 - step_size`` and the activation is always applied per window.

    ``activation`` is applied after blending (or to every window with
    ``activation_per_window``, as nnU-Net does); ``flips`` lists the spatial axes of each extra
    test-time pass; ``select_output`` picks one output of a network that returns a list;
    ``out_channels``, when given, is checked against the first window's output; ``runtime``
    picks the CPU inference runtime (:mod:`volseg.inference.cpu_runtime`; ``"auto"`` converts only large
    jobs of architectures known to gain, always checked against PyTorch, else PyTorch).

    On a CUDA GPU: ``precision`` (``auto`` picks bf16 or fp16 autocast by the GPU, ``fp32`` is
    float32 with TF32 off; ``amp=False`` asks for ``fp32``), ``sw_batch_auto`` (the window batch
    sized from the free memory instead of ``sw_batch_size``), ``cudnn_benchmark`` and
    ``channels_last``. None of these changes a CPU run.
    """

    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.5
    mode: str = "constant"  # constant | gaussian (MONAI) | nnunet
    sigma_scale: float = 0.125
    sw_batch_size: int = 1
    flips: tuple[tuple[int, ...], ...] = ()
    amp: bool = True
    activation: str = "softmax"  # softmax | sigmoid | none
    activation_per_window: bool = False
    padding_mode: str = "constant"
    whole_volume: bool = False  # one pass on the whole volume (MONAI's SimpleInferer); roi_size set per volume
    size_multiple: int = 1  # with whole_volume: each grid size must be a multiple of this
    select_output: int = 0
    out_channels: int | None = None  # checked on the first window, so a mismatch fails early
    runtime: str = "auto"  # auto | torch | onnxruntime | openvino (CPU only; volseg.inference.cpu_runtime)
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (volseg.inference.precision); amp=False means fp32
    sw_batch_auto: bool = True  # on CUDA: size the window batch from free memory (volseg.inference.window_batch)
    cudnn_benchmark: bool = True  # on CUDA: let cuDNN time its algorithms per window shape
    channels_last: bool = False  # on CUDA: windows and network in channels-last 3D (NDHWC)
