"""`eqprop study local`: the study end to end on tiny Fashion-MNIST idx files (written by the
test), its report (JSON, table, figure, generated doc section), --report, and bad options."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from eqprop.cli import main
from eqprop.studies import local
from eqprop.studies.local import BEGIN, END, SYSTEMS, StudySettings, summarize
from eqprop.training.config import ConfigError
from test_training_helpers import write_idx

SYSTEMS_RUN = "ep,cep,vf,eqspike,bp,ldrl"


def write_fashion(root: Path, n_train: int = 128, n_test: int = 48) -> Path:
    """Fashion-MNIST idx files (28x28) in which class k brightens the k-th block of rows."""
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28))
        for k in range(10):
            x[y == k, 2 * k:2 * k + 3, :] += 150
        write_idx(root / "fashion_mnist" / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(root / "fashion_mnist" / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """One study run (6 systems, one step each) shared by the tests below."""
    root = tmp_path_factory.mktemp("local")
    data = write_fashion(root / "data")
    out, pub = root / "out", root / "pub"
    doc = pub / "docs" / "local.md"
    doc.parent.mkdir(parents=True)
    doc.write_text("# Local learning\n\nWritten by hand.\n")
    argv = ["study", "local", "--systems", SYSTEMS_RUN, "--data-dir", str(data), "--limit-train", "64",
            "--limit-test", "40", "--curve-every", "1", "--curve-examples", "32", "--out", str(out),
            "--json", str(pub / "results.json"),
            "--figure", str(pub / "docs" / "figures" / "local_study.png"), "--doc", str(doc)]
    with pytest.MonkeyPatch.context() as mp:  # each run's own learning-curve PNG is not the study's (and slow)
        mp.setattr("eqprop.training.trainer.plot_curves", lambda *a, **k: None)
        assert main(argv) == 0
    return {"out": out, "pub": pub, "doc": doc, "data": data,
            "results": json.loads((out / "results.json").read_text())}


def test_study_runs_every_system_and_records_the_measurements(study):
    res = study["results"]
    runs = {r["system"]: r for r in res["runs"]}
    assert list(runs) == SYSTEMS_RUN.split(",") and all(r["seed"] == 0 for r in runs.values())
    assert res["settings"]["limit_train"] == 64 and res["settings"]["epochs"] == 1
    assert all(r["train_examples"] == 64 and r["test_examples"] == 40 for r in runs.values())
    published = json.loads((study["pub"] / "results.json").read_text())
    assert published == local.portable(res) and published["runs"][0]["out_dir"] == "runs/ep-seed0"
    for name, r in runs.items():
        assert "error" not in r, r.get("error")
        assert r["config"] == SYSTEMS[name].config and r["steps_per_epoch"] == 1
        assert 0.0 <= r["test_error"] <= 100.0 and 0.0 <= r["train_error"] <= 100.0
        (e,) = r["epochs"]
        assert math.isfinite(e["train_loss"]) and e["wall_s"] > 0 and e["cpu_s"] > 0
        assert e["probe_wall_s"] > 0 and e["probe_cpu_s"] >= 0  # the probes' time is taken out
        assert [p["step"] for p in r["curve"]] == [0, 1]
        assert all(0.0 <= p["test_error"] <= 100.0 for p in r["curve"])
        assert (Path(r["out_dir"]) / "metrics.jsonl").is_file()
    assert runs["eqspike"]["algorithm"] == "eqspike" and runs["cep"]["algorithm"] == "continual"
    for name in ("vf",):
        angles = [p["vf_angles_deg"][0][0] for p in runs[name]["curve"]]
        assert all(0.0 < a <= 180.0 for a in angles) and angles[0] > 80.0  # B starts independent of W
    ldrl = runs["ldrl"]["curve"]
    assert "dtp_angles_deg" not in ldrl[0]  # before the first step the feedback maps are zero
    assert all(len(p["dtp_angles_deg"]) == 3 and p["dtp_angles_deg"][2] < 1e-3 for p in ldrl[1:])
    assert "dtp_angles_deg" not in runs["bp"]["curve"][-1] and "vf_angles_deg" not in runs["ep"]["curve"][-1]


def test_systems_of_one_network_start_from_the_same_weights(study):
    runs = {r["system"]: r for r in study["results"]["runs"]}
    assert runs["cep"]["init_digests"] == runs["ep"]["init_digests"]
    assert runs["eqspike"]["init_digests"] == runs["ep"]["init_digests"]
    assert runs["ldrl"]["init_digests"] == runs["bp"]["init_digests"]
    assert runs["vf"]["init_digests"] != runs["ep"]["init_digests"]  # the block holds B as well
    rows = {r["system"]: r for r in summarize(study["results"])}
    assert rows["cep"]["same_init_as_reference"] and rows["eqspike"]["same_init_as_reference"]
    assert rows["vf"]["same_init_as_reference"] is False and rows["ldrl"]["same_init_as_reference"]


def test_table_figure_and_doc_section(study):
    table = (study["out"] / "table.md").read_text()
    runs = {r["system"]: r for r in study["results"]["runs"]}
    for name in SYSTEMS_RUN.split(","):
        line = next(x for x in table.splitlines() if f"| {SYSTEMS[name].label} |" in x)
        assert f"| {runs[name]['test_error']:.2f} |" in line
    assert (study["out"] / "local_study.png").stat().st_size > 1000
    assert (study["pub"] / "docs" / "figures" / "local_study.png").is_file()
    text = study["doc"].read_text()
    assert text.startswith("# Local learning\n\nWritten by hand.\n")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "eqprop study local --systems " + SYSTEMS_RUN in text and "(figures/local_study.png)" in text
    assert "64 training / 40 test images, 1 epoch(s), seeds 0, 1 thread(s)" in text
    assert "C-EP within 1 point of EP" in text and "VF-EP within 1 point of symmetric EP" in text
    assert str(study["out"]) not in text  # no path of the machine it ran on


def test_report_mode_rebuilds_without_training_and_replaces_the_section(study, tmp_path, capsys):
    out = tmp_path / "again"
    out.mkdir()
    (out / "results.json").write_text((study["out"] / "results.json").read_text())
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n\n" + BEGIN + "\nOLD-SECTION\n" + END + "\n\nafter\n")
    assert main(["study", "local", "--report", "--out", str(out), "--doc", str(doc)]) == 0
    assert (out / "table.md").read_text() == (study["out"] / "table.md").read_text()
    text = doc.read_text()
    assert text.startswith("intro\n\n" + BEGIN) and text.endswith(END + "\n\nafter\n") and "OLD-SECTION" not in text
    assert not (out / "runs").exists()  # nothing trained
    assert main(["study", "local", "--report", "--out", str(tmp_path / "none")]) == 2
    assert "no results" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--systems", "ep,nope"], "unknown system(s) ['nope']"),
    (["--systems", "ep,ep"], "names a system twice"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--limit-train", "0"], "--limit-train must be an integer >= 1"),
    (["--curve-examples", "0"], "--curve-examples must be an integer >= 1"),
    (["--curve-every", "-1"], "--curve-every must be an integer >= 0"),
    (["--seeds", "-1"], "--seeds must be distinct integers >= 0"),
    (["--config", "study_published"], "--config does not apply"),
    (["--rules", "cep"], "--rules does not apply"),
    (["optim.lr=oops"], "optim.lr"),
    (["model.nope=1"], "study local: system ep"),
])
def test_bad_options_raise_a_clear_error(argv, message, study, tmp_path, capsys):
    code = main(["study", "local", "--data-dir", str(study["data"]), "--out", str(tmp_path / "o"),
                 "--systems", "ep", *argv] if "--systems" not in argv else
                ["study", "local", "--data-dir", str(study["data"]), "--out", str(tmp_path / "o"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "runs" / "ep-seed0").exists()  # refused before any training


def test_settings_validate():
    with pytest.raises(ConfigError, match="--threads must be an integer >= 1"):
        StudySettings(threads=0).validate()
    with pytest.raises(ConfigError, match="unknown system"):
        StudySettings(systems=()).validate()


def fake_doc(errors: dict[str, list[float]], seeds=(0, 1), ldrl_angles=(12.0, 7.0, 0.0)) -> dict:
    """A results document with the given test errors per system and seed (no training)."""
    runs = []
    for name, errs in errors.items():
        for seed, err in zip(seeds, errs):
            curve = [{"step": 0, "epoch": 0.0, "test_error": 90.0}]
            point = {"step": 10, "epoch": 1.0, "test_error": err}
            if SYSTEMS[name].probe == "dtp":
                point["dtp_angles_deg"] = list(ldrl_angles)
            if SYSTEMS[name].probe == "vf":
                curve[0]["vf_angles_deg"] = [[90.0]]
                point["vf_angles_deg"] = [[60.0]]
            runs.append({"system": name, "seed": seed, "test_error": err, "train_error": err - 1,
                         "wall_s_per_epoch": 2.0, "cpu_s_per_epoch": 1.0, "init_digests": {"w": float(seed)},
                         "curve": [*curve, point]})
    return {"command": "eqprop study local", "machine": {"torch": "x"},
            "settings": {"systems": list(errors), "seeds": list(seeds), "epochs": 1, "limit_train": None,
                         "limit_test": None, "curve_every": 0, "curve_examples": 1000, "threads": 1}, "runs": runs}


def test_targets_are_judged_on_the_mean_test_errors():
    doc = fake_doc({"ep": [15.0, 17.0], "cep": [16.5, 17.4], "vf": [18.0, 18.2], "eqspike": [17.0, 17.5],
                    "bp": [12.0, 12.0], "ldrl": [12.5, 13.0]})
    rows = summarize(doc)
    assert [r["system"] for r in rows] == ["ep", "cep", "vf", "eqspike", "bp", "ldrl"]
    assert rows[0]["test_error"] == pytest.approx(16.0) and rows[0]["test_std"] == pytest.approx(math.sqrt(2))
    met = {t["target"]: t["met"] for t in local.check_targets(rows)}
    assert met["C-EP within 1 point of EP"] is True          # +0.95
    assert met["VF-EP within 1 point of symmetric EP"] is False  # +2.1
    assert met["EqSpike within 1.5 points of rate-based EP"] is True
    assert met["DTP-LDRL within 1 point of backprop"] is True
    assert met["DTP-LDRL angle to backprop's update below 30 degrees throughout training"] is True
    rows = summarize(fake_doc({"bp": [12.0], "ldrl": [12.0]}, seeds=(0,), ldrl_angles=(31.0, 7.0, 0.0)))
    met = {t["target"]: t["met"] for t in local.check_targets(rows)}
    assert met["DTP-LDRL angle to backprop's update below 30 degrees throughout training"] is False
    assert met["C-EP within 1 point of EP"] is None  # not run
    assert "| VF-EP | 18.10 ± 0.14 |" in local.markdown_table(summarize(doc)).replace("| dense ", "")


def test_an_interrupted_study_is_reported_on_its_complete_seeds():
    doc = fake_doc({"ep": [15.0, 17.0], "cep": [16.0, 18.0]})
    doc["runs"] = [r for r in doc["runs"] if not (r["system"] == "cep" and r["seed"] == 1)]
    assert local.complete_seeds(doc) == [0]
    rows = summarize(doc)
    assert [r["seeds"] for r in rows] == [[0], [0]] and rows[0]["test_error"] == 15.0
    text = local.doc_section(doc, None)
    assert "seeds 0," in text and "| C-EP | 16.00 |" in text.replace("| dense ", "")
    assert "| EP | 1 | 17.00 |" in text  # the unfinished seed's runs are listed apart


def test_write_doc_appends_then_replaces(tmp_path):
    path = tmp_path / "d.md"
    local.write_doc(path, BEGIN + "\none\n" + END + "\n")
    local.write_doc(path, BEGIN + "\ntwo\n" + END + "\n")
    assert path.read_text() == BEGIN + "\ntwo\n" + END + "\n"
