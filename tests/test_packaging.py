"""What ``pip install bagel-sr`` gives: the plugin (core and patches) imports and runs without any extra's package."""
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

#: Packages of the extras (data, eval, demo): the plugin must not need them.
EXTRA_PACKAGES = ("diffusers", "pydicom", "nibabel", "pandas", "matplotlib", "pyarrow", "skimage", "scipy", "PIL", "peft")
EXTRA_DISTRIBUTIONS = ("diffusers", "pydicom", "nibabel", "pandas", "matplotlib", "pyarrow", "scikit-image", "scipy",
                       "pillow", "peft")


def test_install_requires_names_no_package_of_an_extra():
    try:
        requires = metadata.requires("bagel-sr") or []
    except metadata.PackageNotFoundError:
        pytest.skip("bagel-sr is not installed (pip install -e .)")
    plain = [r.split(";")[0].strip().lower() for r in requires if "extra ==" not in r]
    assert plain and not [r for r in plain if r.startswith(EXTRA_DISTRIBUTIONS)], plain
    extras = {r.split("extra ==")[1].strip(" \"'") for r in requires if "extra ==" in r}
    assert {"data", "eval", "demo", "lora", "all"} <= extras


def test_every_plugin_module_imports_with_every_extra_blocked():
    """Every module of the core and of the patches imports in a process where importing any extra's package
    fails, and none of them is loaded on the way."""
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        BLOCKED = {EXTRA_PACKAGES!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked extra: " + name)

        sys.meta_path.insert(0, Block())
        import bagel_sr, bagel_sr.patches
        from bagel_sr import PixelLossConfig, with_pixel_loss
        names = [m.name for m in pkgutil.iter_modules(bagel_sr.__path__, "bagel_sr.") if not m.ispkg]
        names += [m.name for m in pkgutil.iter_modules(bagel_sr.patches.__path__, "bagel_sr.patches.")]
        for name in names:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print(len(names), "modules")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[0]) >= 25


def test_the_layer_contract_names_every_module_and_package_of_bagel_sr():
    """``.importlinter`` (checked by ``lint-imports`` in CI) places every top-level module and subpackage of
    bagel_sr in a layer, and lists every core module among those that may not import an extra's package."""
    import configparser
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    config = configparser.ConfigParser()
    config.read(repo / ".importlinter")
    layered = set(re.findall(r"bagel_sr\.(\w+)", config["importlinter:contract:layers"]["layers"]))
    plugin = set(re.findall(r"bagel_sr\.(\w+)", config["importlinter:contract:plugin-needs"]["source_modules"]))
    core = {p.stem for p in (repo / "bagel_sr").glob("*.py") if p.stem != "__init__"}
    packages = {p.parent.name for p in (repo / "bagel_sr").glob("*/__init__.py")} | {"patches", "eval", "train"}
    assert core | packages == layered, (core | packages) ^ layered
    assert core | {"patches"} == plugin, (core | {"patches"}) ^ plugin
