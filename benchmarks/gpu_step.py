"""What the pixel term costs in one bf16 training step of BAGEL at BAGEL-7B-MoT's widths, on a GPU.

    python benchmarks/gpu_step.py --bagel_root PATH [--layers 2,4] [--tokens 16384] [--paired 4] [--json FILE]
    python benchmarks/gpu_step.py --bagel_root PATH --device cpu --widths toy --tokens 256 --image_px 64   # CPU test

The benchmark lives in ``bagel_sr.gpu_check.step`` (documented there) so that ``python -m bagel_sr.gpu_check``
runs it too, followed by the 28-layer extrapolation and the goal; this script prints the JSON and, with two
depths or more, the same tables.
"""
import sys

from bagel_sr.gpu_check import report as gpu_report
from bagel_sr.gpu_check import step as gpu_step


def main(argv=None) -> int:
    args = gpu_step.parse(argv)
    result = gpu_step.run(args)
    extra = gpu_report.extrapolate(result["depths"]) if len(result["depths"]) >= 2 else None
    print("\n".join(gpu_report.bench_markdown(result, extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
