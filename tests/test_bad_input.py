"""Each bad input of tests/bad_input_cases.py ends with exit code 2, a message naming the problem
or the fix, and no traceback -- before any training or sampling."""

from __future__ import annotations

import warnings

import pytest

from bad_input_cases import CASES, run_case


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}: {c.what}" for c in CASES])
def test_bad_input_is_refused_with_a_clear_message(case, tmp_path, teacher_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, err = run_case(case, str(tmp_path), teacher_dir)
    assert code == 2, err
    assert case.expect in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or case.group == "output"  # nothing was trained
