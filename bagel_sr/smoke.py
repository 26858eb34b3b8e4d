"""``python -m bagel_sr.smoke --bagel_root PATH ...``: the CPU dry run of your checkout's own ``main()``.

An entry alias: the dry run patches a checkout, so it lives with the patches (``bagel_sr.patches.smoke``, where
its documentation is); this module only runs that one as ``__main__``.
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("bagel_sr.patches.smoke", run_name="__main__", alter_sys=True)
