"""Test session set-up: lets a CUDA-built torchvision import next to a CPU torch build (as on CI).

BAGEL's data code imports ``torchvision.transforms``; see ``bagel_sr.patches.cpu.declare_torchvision_ops``.
"""
from bagel_sr.patches.cpu import declare_torchvision_ops

declare_torchvision_ops()
