"""``python -m bagel_sr.gpu_check --bagel_root PATH [--out DIR]``: the one-command GPU check of a checkout (its own
``main()`` on CUDA with the pixel term, then what the term costs at BAGEL-7B's widths).

An entry alias: the check patches a checkout, so it lives with the patches (``bagel_sr.patches.gpu_check``, where
its documentation is); this module only runs that one as ``__main__``.
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("bagel_sr.patches.gpu_check", run_name="__main__", alter_sys=True)
