"""No import cycles in bagel_sr: neither between two modules (imports inside functions count) nor between two
packages (e.g. ``bagel_sr.eval`` and ``bagel_sr.embedded`` importing each other).

The graph is ``grimp``'s (the library under ``lint-imports``) of the package as pip installs it: ``patches/``,
``eval/`` and ``train/`` carry their import names (``bagel_sr.patches``, ...) only there, so the test lays the
folders out as ``setup.py``'s ``packages`` / ``package_dir`` say and builds the graph in a fresh interpreter.
"""
import ast
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Run in a fresh interpreter with the laid-out tree first on sys.path: prints the strongly connected components
#: (more than one node) of the module graph and of the graph of packages, as JSON.
GRAPH_SCRIPT = textwrap.dedent("""
    import json, sys  # run with cwd = the laid-out tree, which is first on sys.path (python -c)
    import grimp

    def components(nodes, edges):
        index, low, stack, on, out = {}, {}, [], set(), []

        def visit(v):  # Tarjan's algorithm
            index[v] = low[v] = len(index)
            stack.append(v)
            on.add(v)
            for w in sorted(edges.get(v, ())):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

        sys.setrecursionlimit(10000)
        for v in sorted(nodes):
            if v not in index:
                visit(v)
        return out

    root = sys.argv[2]
    graph = grimp.build_graph(root)
    modules = set(graph.modules)
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    packages = {m for m in modules if graph.find_children(m)}

    def package_of(m):
        return m if m in packages else m.rpartition(".")[0]

    pkg_edges = {}
    for m, targets in edges.items():
        for t in targets:
            a, b = package_of(m), package_of(t)
            # a package and the packages inside it are one unit here only when one contains the other
            if a != b and not b.startswith(a + ".") and not a.startswith(b + "."):
                pkg_edges.setdefault(a, set()).add(b)
    details = {}
    module_cycles = components(modules, edges)
    for comp in module_cycles:
        for a in comp:
            for b in edges[a] & set(comp):
                for d in graph.get_import_details(importer=a, imported=b):
                    details.setdefault(" <-> ".join(comp), []).append(f"{a}:{d['line_number']} {d['line_contents']}")
    print(json.dumps({"modules": len(modules), "packages": sorted(packages), "module_cycles": module_cycles, "details": details,
                      "package_cycles": components({package_of(m) for m in modules}, pkg_edges)}))
""")


def installed_layout(repo: Path, site: Path) -> list[str]:
    """Copy the ``.py`` files of every package that ``setup.py`` lists to where pip would install them; returns
    the packages."""
    call = next(n for n in ast.walk(ast.parse((repo / "setup.py").read_text(encoding="utf-8")))
                if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    packages = ast.literal_eval(kw["packages"])
    package_dir = ast.literal_eval(kw["package_dir"]) if "package_dir" in kw else {}
    for package in packages:
        source = repo / package_dir.get(package, package.replace(".", "/"))
        target = site.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for file in source.glob("*.py"):
            shutil.copy(file, target / file.name)
    return packages


def import_cycles(site: Path, root: str) -> dict:
    out = subprocess.run([sys.executable, "-c", GRAPH_SCRIPT, str(site), root], capture_output=True, text=True,
                         timeout=300, cwd=site)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_no_import_cycle_in_bagel_sr(tmp_path):
    packages = installed_layout(REPO, tmp_path)
    found = import_cycles(tmp_path, "bagel_sr")
    assert set(found["packages"]) == set(packages) and found["modules"] > 100  # patches/, eval/, train/ included
    assert not found["module_cycles"], json.dumps(found["details"], indent=1)
    assert not found["package_cycles"], found["package_cycles"]


def test_the_check_sees_a_cycle_through_an_import_inside_a_function(tmp_path):
    """The same check on a small package whose two modules import each other (one of them inside a function) and
    whose two subpackages import each other."""
    pkg = tmp_path / "cyc"
    for folder in (pkg, pkg / "low", pkg / "high"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (pkg / "low" / "x.py").write_text("def f():\n    from ..high import y\n    return y\n")
    (pkg / "low" / "w.py").write_text("")
    (pkg / "high" / "y.py").write_text("")
    (pkg / "high" / "z.py").write_text("from ..low import w\n")  # no module cycle, but the packages form one
    found = import_cycles(tmp_path, "cyc")
    assert found["module_cycles"] == [["cyc.a", "cyc.b"]]
    assert found["package_cycles"] == [["cyc.high", "cyc.low"]]
