"""Quantize explains itself: each variant's verdict against the unquantized reference, thresholds as stated."""

from __future__ import annotations

from mactuner.quantize.compare import QuantizeReport, VariantResult, report_verdicts, variant_verdict


def variant(name: str, perplexity: float | None, size: int = 100, error: str | None = None) -> VariantResult:
    return VariantResult(name, f"/x/{name}", size, None, 10.0, 0.1, perplexity, "Paris.", 1.0, error=error)


def test_verdicts_follow_the_stated_thresholds():
    reference = variant("merged", 23.3, size=540)
    assert variant_verdict(reference, reference).level == "reference"
    good = variant_verdict(variant("int8-weight-only", 23.9, 270), reference)
    assert good.level == "good" and good.text == "perplexity +3 %, 2.0× smaller: recommended"
    assert variant_verdict(variant("a", 28.0), reference).level == "acceptable"
    assert variant_verdict(variant("b", 34.0), reference).level == "worse"
    bad = variant_verdict(variant("int8-dynamic", 64.3, 360), reference)  # the figure issue 11 saw, with no warning
    assert bad.level == "not recommended" and bad.text.startswith("perplexity 2.8× worse") and round(bad.ratio, 2) == 2.76
    assert variant_verdict(variant("bnb-4bit", None, error="needs CUDA"), reference).text == "not made: needs CUDA"


def test_report_table_carries_the_verdict():
    report = QuantizeReport("cpu", "text", 100, [variant("merged", 20.0), variant("int4-weight-only", 50.0)])
    assert report_verdicts(report)["int4-weight-only"].level == "not recommended"
    assert [row["verdict"].split(":")[-1].strip() for row in report.table()] == [
        "the reference the others are compared with", "not recommended"]
