"""The README's promises about the layout, measured: line budgets and the import rules of DESIGN.md."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = {"model", "processor", "parallel", "ops", "sampler", "verifiers", "rl"}
STAGES = {"sft", "m3rl", "efficient_rl", "search_rl", "infer"}


def readme_budgets():
    """{file: budget} from the README's layout table (rows like | `model.py` | ... | 900 |)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    return {m[1]: int(m[2]) for m in re.finditer(r"^\| `(\w+\.py)` \|.*\| (\d+) \|$", text, re.M)}


def non_blank_lines(path):
    return sum(1 for line in open(path) if line.strip())


def our_imports(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & (LIBRARY | STAGES)


def test_line_budgets():
    budgets = readme_budgets()
    assert "model.py" in budgets
    for name, budget in budgets.items():
        path = os.path.join(ROOT, name)
        if os.path.exists(path):
            assert non_blank_lines(path) <= budget, f"{name}: {non_blank_lines(path)} non-blank lines > {budget}"


def test_import_rules():
    assert our_imports(os.path.join(ROOT, "model.py")) == set(), "model.py imports nothing of ours"
    for name in STAGES | LIBRARY:
        path = os.path.join(ROOT, name + ".py")
        if os.path.exists(path):
            assert not (our_imports(path) & STAGES), f"{name}.py imports a stage file"
