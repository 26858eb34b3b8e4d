"""Import-time guards for the embedded bench.

A broken ``torchvision`` (e.g. a wheel built for another torch) raises on import, and ``transformers`` imports it
whenever it believes it is installed, which breaks ``import diffusers``.  Nothing here needs torchvision, so when
its import fails we tell ``transformers`` and ``diffusers`` it is absent.  A working torchvision is left alone.
"""
import sys


def guard_broken_torchvision() -> bool:
    """Return True when torchvision was broken and has been hidden."""
    if "torchvision" in sys.modules and getattr(sys.modules["torchvision"], "__version__", None):
        return False
    try:
        import torchvision  # noqa: F401
        return False
    except ModuleNotFoundError:
        return False  # not installed: transformers already knows
    except Exception as exc:  # ImportError, RuntimeError("operator torchvision::nms does not exist"), ...
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            sys.modules.pop(name, None)
        try:
            import transformers.utils.import_utils as tiu

            tiu._torchvision_available = False
        except Exception:
            pass
        try:
            import diffusers.utils.import_utils as diu

            diu._torchvision_available = False
        except Exception:
            pass
        return True  # quietly: nothing of the demo uses torchvision, and a warning here led every --help
