"""DESIGN.md section 1: imports only point downwards."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "streamer"

FORBIDDEN = {
    "core": {
        "asyncio",
        "torch",
        "transformers",
        "socket",
        "websockets",
        "aiomqtt",
        "time",
        "streamer.engine",
        "streamer.audio",
        "streamer.sinks",
        "streamer.service",
        "sounddevice",
        "soundfile",
    },
    "engine": {"streamer.audio", "streamer.sinks", "streamer.service", "websockets", "aiomqtt"},
    "sinks": {"torch", "transformers", "streamer.engine", "streamer.service"},
    "audio": {"streamer.engine", "streamer.sinks", "streamer.service", "transformers"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layers_import_only_downwards():
    problems = []
    for layer, banned in FORBIDDEN.items():
        for path in sorted((PKG / layer).rglob("*.py")):
            for mod in imported_modules(path):
                for b in banned:
                    if mod == b or mod.startswith(b + "."):
                        problems.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not problems, "\n".join(problems)


def test_only_vad_imports_torch_among_adapters():
    for path in (PKG / "audio").rglob("*.py"):
        if path.name == "vad.py":
            continue
        assert "torch" not in imported_modules(path), path


def test_the_checker_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\nfrom streamer.engine import loader\n")
    assert imported_modules(f) == {"torch", "streamer.engine"}
