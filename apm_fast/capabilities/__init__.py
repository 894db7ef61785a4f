"""The paper's other capabilities, on the package's one model, trainer, driver and image pipeline:

* SSL grid distillation (the authors' COCO model): :func:`distill` (resumable exactly after a
  kill), :func:`export_official` (the authors' state-dict layout), :func:`preprocess_ssl` (their
  SSL input: BGR, stretched, one min-max scaling), the DINOv2 teacher in
  :mod:`apm_fast.teachers.dinov2`;
* islands of agreement (Figure 3): :func:`islands` (the grid features during TTT, kept by the
  engine after chosen steps) and :func:`render_islands`;
* RGB decoding (Figure 5 (ii)): :func:`decode`, :func:`load_model` (either checkpoint layout),
  :func:`render_decoding`;
* perceptual interpolation: :func:`interpolate` (triggers mixed between two images, every column
  asked with them) and :func:`render_interpolation`.

The command line: ``apm-fast distill``, ``islands``, ``decode``, ``interpolate``.
"""
from .decoding import Decoding, decode, infer_official_config, load_model, render_decoding
from .distillation import DistillResult, DistillSettings, distill, epoch_order, export_official, official_state_dict
from .inputs import INPUT_KINDS, cell_colours, display_rgb, preprocess_ssl, ssl_normalize, student_input
from .interpolation import Interpolation, interpolate, render_interpolation
from .agreement import Islands, islands, iterations, render_islands

__all__ = ["distill", "DistillSettings", "DistillResult", "epoch_order", "export_official", "official_state_dict",
           "preprocess_ssl", "ssl_normalize", "student_input", "cell_colours", "display_rgb", "INPUT_KINDS",
           "islands", "Islands", "iterations", "render_islands", "decode", "Decoding", "load_model",
           "infer_official_config", "render_decoding", "interpolate", "Interpolation", "render_interpolation"]
