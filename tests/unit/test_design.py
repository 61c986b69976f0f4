"""Issue 13: the design check (tools/check_design.py, run by `make lint`) fails on
an import cycle, a private name imported across modules and an over-long
function, and passes on src/tuneforge as it is."""

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _check_design():
    spec = importlib.util.spec_from_file_location("check_design", ROOT / "tools" / "check_design.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_the_design_check_finds_each_kind_of_problem(tmp_path):
    design = _check_design()
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    root = _package(tmp_path, {
        "a.py": "def f():\n    from pkg.b import g\n    return g\n",  # a cycle hidden in a function
        "b.py": "from pkg.a import f\nfrom pkg.c import _secret\n\ndef g():\n    return f\n",
        "c.py": f"_secret = 1\n\n\ndef long_one():\n{body}\n\n\n# long: a table, kept whole\ndef allowed():\n{body}\n",
    })
    problems = design.check(root)
    assert any(p.startswith("import cycle: pkg.a -> pkg.b") for p in problems), problems
    assert any("imports the private name '_secret' from pkg.c" in p for p in problems), problems
    assert any("function long_one is 86 lines" in p for p in problems), problems
    assert not any("allowed" in p for p in problems) and len(problems) == 3


def test_src_tuneforge_passes_the_design_check():
    assert _check_design().check(ROOT / "src" / "tuneforge") == []
