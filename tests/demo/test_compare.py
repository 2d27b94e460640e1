"""demo/compare.py: two evaluate reports of the same turns, paired turn by turn; and evaluate's seed block."""

from __future__ import annotations

import json

import numpy as np
import pytest

from framepack_rt.demo import compare as C
from framepack_rt.demo import evaluate as E
from tests.demo.test_evaluate import FakePipe, FakeStream


def _report(intact: list[float], seeds: list[int] | None = None) -> dict:
    seeds = seeds if seeds is not None else list(range(10_000, 10_000 + len(intact)))
    details = [{"seed": s, "frames": 217, "intact": v, "one_object": v, "colour_ok": 1.0, "area_ok": v,
                "largest_jump": 0.05, "largest_jump_across_gaps": 0.05 + 0.1 * (v < 0.5)}
               for s, v in zip(seeds, intact)]
    return {"details": details, "intact_per_section": [1.0] * 6,
            **{k: float(np.mean([d[k] for d in details])) for k in C.RATES}}


def test_paired_difference_its_standard_error_and_the_turns_won():
    a, b = _report([0.5, 0.6, 0.7, 0.8]), _report([0.6, 0.6, 0.9, 0.9])
    p = C.paired(a, b)
    diff = np.array([0.1, 0.0, 0.2, 0.1])
    assert p["mean"] == pytest.approx(diff.mean()) and p["se"] == pytest.approx(diff.std(ddof=1) / 2)
    assert (p["turns"], p["b_better"], p["b_worse"]) == (4, 3, 0)
    assert C.paired(b, a)["mean"] == pytest.approx(-diff.mean())


def test_reports_of_other_turns_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="different turns .*same --fidelity-seed"):
        C.paired(_report([0.5, 0.6]), _report([0.5, 0.6], seeds=[10_224, 10_225]))
    with pytest.raises(ValueError, match="no fidelity turns: .*--fidelity-runs"):
        C.fidelity_of({"fidelity": None}, "a.json")


def test_jumps_count_unmeasurable_turns_as_over():
    report = _report([0.9, 0.2, 0.9])
    report["details"][0]["largest_jump_across_gaps"] = float("nan")  # fewer than two intact frames
    assert C.turns_over(report["details"]) == 2 and C.median_jump(report) == pytest.approx(0.1)


class BlankLastSections(FakePipe):
    """The fake world model, but the ball is gone (background only) from the fifth section on."""

    class Stream(FakeStream):
        def __next__(self):
            section = super().__next__()
            if self.sections > 4:
                section.frames = np.broadcast_to(np.asarray(self.bg, np.uint8), section.frames.shape).copy()
            return section

    def stream(self, image, prompt, seed=0, steps=None, decode_overlap=None):
        return self.Stream(image, prompt, self.contrary)


def test_evaluate_takes_a_seed_block_and_compare_pairs_two_models_over_it(tmp_path, capsys):
    common = ["--runs", "0", "--drift-seconds", "0", "--fidelity-runs", "2", "--fidelity-seed", "10224"]
    good, bad, other = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "other.json"
    report = E.main([*common, "--json", str(good)], pipe_factory=FakePipe)
    E.main([*common, "--json", str(bad)], pipe_factory=BlankLastSections)
    assert [d["seed"] for d in report["fidelity"]["details"]] == [10_224, 10_225]
    assert "direction" not in report and "seeds 10,224-10,225" in capsys.readouterr().out  # --runs 0 skips them
    result = C.main([str(good), str(bad)])
    lost = result["rates"]["intact"]["paired"]
    # Two of six sections blanked: a third of the frames after the start frame, in both turns alike.
    assert lost["mean"] == pytest.approx(-2 * 36 / 217, abs=0.01) and lost["b_worse"] == 2
    assert result["intact_per_section"]["b"][4:] == [0.0, 0.0] and min(result["intact_per_section"]["a"]) > 0.9
    assert "intact" in capsys.readouterr().out
    E.main(["--runs", "0", "--drift-seconds", "0", "--fidelity-runs", "2", "--json", str(other)], pipe_factory=FakePipe)
    with pytest.raises(SystemExit):
        C.main([str(good), str(other)])
    assert "different turns" in capsys.readouterr().err
    assert json.loads(good.read_text())["fidelity"]["details"][0]["seed"] == 10_224
