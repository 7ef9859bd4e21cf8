"""bench/sweep_table.py on CPU: the range table of a bench/sweep_variants.sh run."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sweep_table = runpy.run_path(str(BENCH / "sweep_table.py"))


def bench_row(shape: str, m: int, us: float) -> str:
    return f"| {shape} | 32 | row | {m} | {us:.2f} | 60% | 1.00 | 3.18 |\n"


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Two builds timed in two alternating rounds, with the other lines the script prints between them."""
    text = ""
    for round_, (base_us, tree_us) in enumerate([(5.30, 5.41), (5.38, 5.41)], start=1):
        for variant, us in (("src=base.cu", base_us), ("default", tree_us)):
            text += f"## variant '{variant}' (round {round_})\n"
            if round_ == 1:
                text += "      1 ptxas warning : Registers are spilled ...\n16 passed, 84 deselected in 5.00s\n"
            text += "NVIDIA H100 80GB HBM3, 2026-11-27; device-to-device copy 2.976 TB/s (read + write)\n"
            text += bench_row("4096 x 4096", 1, us) + bench_row("4096 x 4096", 8, us + 0.8)
            if variant == "default":
                text += bench_row("14336 x 4096", 1, us + 8.5)
    path = tmp_path / "sweep.txt"
    path.write_text(text)
    return path


def test_rows_give_the_range_of_each_build_over_the_rounds(sweep):
    times, variants = sweep_table["read_sweeps"]([str(sweep)])
    assert variants == ["src=base.cu", "default"]
    lines = sweep_table["table"](times, [("base", "src=base.cu"), ("tree", "default")], [1, 8])
    assert lines[0] == "| K x N | gs, zeros | base | tree |"
    assert lines[2] == "| 4096 x 4096 | 32, row | 5.30-5.38 / 6.10-6.18 | 5.41 / 6.21 |"
    # A shape that one build did not time shows as "-" there, not as a range of nothing.
    assert lines[3] == "| 14336 x 4096 | 32, row | - / - | 13.91 / - |"


def test_the_command_line_names_a_variant_the_files_lack(sweep, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["sweep_table.py", str(sweep), "--build", "x=ET_INT4_PREFETCH=0"])
    with pytest.raises(SystemExit):
        sweep_table["main"]()
    assert "no variant ['ET_INT4_PREFETCH=0']" in capsys.readouterr().err
