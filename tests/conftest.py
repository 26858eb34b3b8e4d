"""Test session set-up: lets a CUDA-built torchvision import next to a CPU torch build (dev machines only).

BAGEL's data code imports ``torchvision.transforms``.  A torchvision wheel built for CUDA cannot load its compiled
operators next to a CPU-only torch, and its import then fails in its meta registrations of ``nms``/``qnms``.  Its
pure-Python transforms, all BAGEL's data code uses, work once those two operator schemas exist; we declare them
only in that situation, so a matching torchvision (or none) is left alone.
"""
import glob
import importlib.util
import os

import torch

_TORCHVISION_LIB = None


def _declare_missing_torchvision_ops() -> None:
    global _TORCHVISION_LIB
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    try:
        if libs:
            torch.ops.load_library(libs[0])
            return
    except OSError:
        pass
    _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.define(
        "qnms(Tensor qdets, float dets_scale, int dets_zero_point, Tensor qscores, float scores_scale, "
        "int scores_zero_point, float iou_threshold) -> Tensor"
    )


_declare_missing_torchvision_ops()
