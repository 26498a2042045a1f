"""The engine and analysis never import streamlit or plotly; the engine's packages import one
way (runtime <- stream <- exits <- spec <- engine; moe on runtime, stream and engine; train on
everything, nothing on train); the code passes ruff."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import pkgutil, importlib, sys
import m2r2core, analysis
for package in (m2r2core, analysis):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("streamlit", "plotly"))
print(",".join(bad))
"""


def test_engine_and_analysis_import_no_ui():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    out = subprocess.run([ruff, "check", "m2r2core", "analysis", "app", "tests",
                          "streamlit_app.py"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


BASE = {"config", "errors", "trace", "artifacts"}
"""Modules every room may import."""
ROOMS = {
    "runtime": set(),
    "stream": {"runtime"},
    "exits": {"runtime", "stream"},
    "spec": {"runtime", "stream", "exits"},
    "engine": {"runtime", "stream", "exits", "spec"},
    "moe": {"runtime", "stream", "engine"},
    "train": {"runtime", "stream", "exits", "spec", "engine", "moe"},
}
"""What each room of m2r2core may import besides itself and BASE (inside functions too)."""


def imported_modules(path: Path) -> set[str]:
    """Every module an m2r2core file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def room_of(path: Path) -> str:
    parts = path.relative_to(ROOT / "m2r2core").with_suffix("").parts
    return parts[0]


def test_engine_packages_import_one_way():
    wrong = []
    files = sorted((ROOT / "m2r2core").rglob("*.py"))
    assert {room_of(p) for p in files} - {"__init__"} <= set(ROOMS) | BASE, (
        "a new module or package needs a room in ROOMS")
    for path in files:
        room = room_of(path)
        for name in imported_modules(path):
            top, *rest = name.split(".")
            if top in ("analysis", "app") and room != "train":
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            if top != "m2r2core" or not rest or rest[0] in BASE or rest[0] == room:
                continue
            if room in BASE or rest[0] not in ROOMS.get(room, set()):
                wrong.append(f"{path.relative_to(ROOT)} ({room}) imports {name}")
    assert not wrong, "\n".join(wrong)


def test_analysis_and_app_never_import_training():
    for folder in ("analysis", "app"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            names = imported_modules(path)
            assert not any(n.startswith("m2r2core.train") for n in names), path


def test_trained_files_live_outside_the_code_package():
    code = ROOT / "m2r2core"
    weights = [p for p in code.rglob("*") if p.suffix in (".safetensors", ".pt", ".bin")]
    assert not weights, weights
    assert (ROOT / "artifacts" / "smollm2-135m-instruct" / "card.json").is_file()


def test_no_page_script_has_a_bare_string_streamlit_would_print():
    """`streamlit run` prints every bare string statement of a script it executes ("magic"):
    in a page, an attribute docstring below a constant appears on the page. Only the module
    docstring may be a bare string there."""
    scripts = [ROOT / "streamlit_app.py", *sorted((ROOT / "app" / "pages").glob("*.py"))]
    for path in scripts:
        body = ast.parse(path.read_text()).body
        bare = [node.lineno for node in body[1:] if isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
        assert not bare, f"{path.name}: bare strings at lines {bare}"
