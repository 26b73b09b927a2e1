"""The examples of docs/extending.md run, give what the page says, and are shown verbatim."""
import runpy
import subprocess
import sys
from pathlib import Path

import torch

import eqprop
from eqprop.testing import check_estimator

ROOT = Path(__file__).resolve().parents[1]


def test_extending_page_shows_the_example_files_verbatim():
    page = (ROOT / "docs" / "extending.md").read_text()
    for name in ("custom_energy.py", "custom_rule.py"):
        assert (ROOT / "examples" / name).read_text().rstrip() in page, name


def test_custom_energy_block_learns_by_ep_like_finite_differences():
    mod = runpy.run_path(str(ROOT / "examples" / "custom_energy.py"))
    torch.manual_seed(1)
    block = mod["LateralHopfield"](3, 5, T1=400, tol=1e-12)
    report = check_estimator(block, eqprop.EP(beta=1e-4, T2=400, tol=1e-12), torch.randn(2, 3))
    assert report.cosine > 1 - 1e-8 and report.rel_error < 1e-5
    # BPTT from the equilibrium and ID agree with it too: the block works with every core estimator
    for est in (eqprop.ID(tol=1e-12, max_iter=2000), eqprop.BPTT(T2=300)):
        assert check_estimator(block, est, torch.randn(2, 3)).rel_error < 1e-6


def test_custom_rule_is_registered_and_its_bias_is_first_order():
    mod = runpy.run_path(str(ROOT / "examples" / "custom_rule.py"))
    assert "skew-ep" in eqprop.estimator_names()
    torch.manual_seed(2)
    block = eqprop.DenseHopfield([3, 5, 2], activation="sigmoid", T1=400, tol=1e-12)
    u = torch.randn(2, 3)
    errs = [check_estimator(block, eqprop.make_estimator("skew-ep", beta_plus=b, beta_minus=b / 2, T2=400,
                                                         tol=1e-12), u).rel_error for b in (1e-2, 1e-3)]
    assert 5 < errs[0] / errs[1] < 20  # O(beta): ten times smaller beta, ten times smaller error
    equal = check_estimator(block, mod["SkewEP"](beta_plus=1e-2, beta_minus=1e-2, T2=400, tol=1e-12), u)
    centered = check_estimator(block, eqprop.EP(beta=1e-2, T2=400, tol=1e-12), u)
    assert abs(equal.rel_error - centered.rel_error) < 1e-9  # equal nudges: centered EP
    try:
        mod["SkewEP"](beta_plus=0.0)
    except ValueError as e:
        assert "beta_plus" in str(e)
    else:
        raise AssertionError("SkewEP(beta_plus=0) was accepted")


def test_examples_run_as_scripts():
    for name in ("custom_energy.py", "custom_rule.py"):
        out = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        assert "cosine 1.0000000" in out.stdout, out.stdout
