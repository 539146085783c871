"""The configuration reference ``docs/config.md`` is generated from the pydantic models and kept in sync."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from tpgrpo.config import Config, config_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
REGENERATE = ("python -c \"from pathlib import Path; from tpgrpo.config import config_reference; "
              "Path('docs/config.md').write_text(config_reference(), encoding='utf-8')\"")


def _fields():
    """(dotted name, FieldInfo) of every field of every section, top-level fields first."""
    out = []
    for name, f in Config.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out += [(f"{name}.{sub}", sf) for sub, sf in f.annotation.model_fields.items()]
        else:
            out.append((name, f))
    return out


def _row(ref: str, field: str) -> list[str]:
    """The cells of ``field``'s row, split on unescaped ``|`` only (escapes are kept as they are written)."""
    for line in ref.splitlines():
        if line.startswith(f"| `{field}` |"):
            cells, cur, i = [], "", 1
            while i < len(line):
                if line[i] == "\\" and i + 1 < len(line):
                    cur += line[i:i + 2]
                    i += 2
                    continue
                if line[i] == "|":
                    cells.append(cur.strip())
                    cur = ""
                else:
                    cur += line[i]
                i += 1
            return cells
    raise AssertionError(f"{field}: no row in the configuration reference")


def test_doc_is_up_to_date():
    assert DOC.is_file(), f"{DOC} is missing; generate it from the repository root with:\n{REGENERATE}"
    assert DOC.read_text(encoding="utf-8") == config_reference(), (
        f"docs/config.md is out of date with src/tpgrpo/config.py; regenerate it from the repository root with:\n"
        f"{REGENERATE}")


def test_every_field_documented():
    ref = config_reference()
    fields = _fields()
    assert len(fields) > 50
    for name, f in fields:
        assert f.description and f.description.strip(), f"{name}: no description"
        cells = _row(ref, name)
        assert len(cells) == 4 and all(cells), f"{name}: incomplete row {cells}"
    for name, f in Config.model_fields.items():  # sections carry a description too (the table's intro line)
        assert f.description and f.description.strip(), f"{name}: no description"
    rows = [line for line in ref.splitlines() if line.startswith("| `")]
    assert len(rows) == len(fields)  # no extra rows, none twice


def test_rendering_spot_checks():
    ref = config_reference()
    assert ref == config_reference()  # deterministic
    assert "section.field=value" in ref and "configs/" in ref and "tests/test_config_reference.py" in ref
    assert _row(ref, "sampling.kernel")[1] == "sde \\| cps \\| dance"  # a Literal's choices, | escaped
    assert _row(ref, "sampling.kernel")[2] == "`cps`"
    assert _row(ref, "sampling.num_steps")[1:3] == ["int (≥ 2, ≤ 1000)", "`10`"]
    assert _row(ref, "sampling.noise_level")[1] == "float (> 0, ≤ 10)"
    assert _row(ref, "training.ema_decay")[1] == "float (≥ 0, < 1)"
    assert _row(ref, "training.lr")[2] == "`0.0003`"
    assert _row(ref, "dance.std_eps")[2] == "`1e-8`"
    assert _row(ref, "model.path")[1:3] == ["str \\| None", "`null`"]
    assert _row(ref, "model.lora_target_modules")[1] == "list[str] \\| None (length ≥ 1)"
    assert _row(ref, "tempflow.branch_steps")[1] == "list[int] \\| None"
    assert _row(ref, "reward.weights")[1:3] == ["dict[str, float]", "`{}`"]
    assert _row(ref, "tpgrpo.balance")[1:3] == ["bool", "`true`"]
    assert _row(ref, "run_dir")[1:3] == ["str (length ≥ 1)", "`runs/default`"]
    # top-level fields come first, then the sections in the model's order
    headings = [line for line in ref.splitlines() if line.startswith("## ")]
    assert headings == ["## Top-level fields"] + [f"## `{name}`" for name, f in Config.model_fields.items()
                                                  if isinstance(f.annotation, type)
                                                  and issubclass(f.annotation, BaseModel)]
    # a | inside a description is escaped, so every row keeps its four cells
    assert "largest \\|R_W − R_0\\|" in _row(ref, "tpgrpo.balance_rank")[3]
