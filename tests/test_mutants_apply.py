"""Every mutant of tests/check_mutants.py still applies to today's code.

A mutant whose code has moved or changed would otherwise be skipped in
silence, and the mistake it stands for would go unguarded.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_mutants  # noqa: E402


def test_every_mutant_applies():
  check_mutants.check_all()


def test_a_stale_edit_is_reported_with_what_to_update():
  edit = check_mutants.Edit("x.py", "f", "a + b", "a - b")
  assert check_mutants.apply_edit(
      "def f(a, b):\n  return (a +\n          b)\n", edit) == (
          "def f(a, b):\n  return (a - b)\n")
  with pytest.raises(check_mutants.StaleMutant, match="occurs 0 times"):
    check_mutants.apply_edit("def f(a, b):\n  return a * b\n", edit)
  with pytest.raises(check_mutants.StaleMutant, match="no function 'f'"):
    check_mutants.apply_edit("def g(a, b):\n  return a + b\n", edit)
