"""Quantize explains itself: each variant's verdict weighs quality, speed and size against the unquantized
reference, says which it favoured, and follows the stated limits. Each case is a constructed measurement
with the one verdict it must get (the figures of issue 21's walk-through among them)."""

from __future__ import annotations

import pytest

from mactuner.quantize.compare import (
    QuantizeReport,
    VariantResult,
    report_highlights,
    report_verdicts,
    variant_verdict,
)

MB = 1_000_000


def variant(name: str, perplexity: float | None, size: int = 540 * MB, tps: float | None = 28.3,
            error: str | None = None) -> VariantResult:
    return VariantResult(name, f"/x/{name}", size, None, tps, 0.1, perplexity, "Paris.", 1.0, error=error)


REFERENCE = variant("merged", 23.3, 540 * MB, 28.3)


@pytest.mark.parametrize("measured, level, text", [
    # as good, half the size, faster: nothing paid
    (variant("int8-weight-only", 23.9, 270 * MB, 33.0), "recommended",
     "perplexity +3 %, 2.0× smaller, 1.2× faster: recommended: favours speed and size at no cost"),
    # issue 21: as good and smaller, but 16.8 tokens/s against the reference's 28.3: no longer "recommended"
    (variant("int8-weight-only", 23.9, 270 * MB, 16.8), "trade-off",
     "perplexity +3 %, 2.0× smaller, 1.7× slower: a trade-off: favours size over speed"),
    (variant("int4-weight-only", 24.0, 160 * MB, 9.6), "trade-off",
     "perplexity +3 %, 3.4× smaller, 2.9× slower: a trade-off: favours size over speed"),
    # issue 21: the fastest variant (51.2 tokens/s) with a perplexity 2.8× worse: the verdict says what it favours
    (variant("int8-dynamic", 64.3, 360 * MB, 51.2), "not recommended",
     "perplexity 2.8× worse, 1.5× smaller, 1.8× faster: not recommended: favours speed and size over quality"),
    (variant("a", 28.0, 270 * MB, 30.0), "trade-off",
     "perplexity +20 %, 2.0× smaller, same speed: a trade-off: favours size over quality"),
    (variant("b", 34.0, 270 * MB, 30.0), "check its answers",
     "perplexity +46 %, 2.0× smaller, same speed: check its answers: favours size over quality"),
    # neither smaller nor faster: nothing to gain, however good
    (variant("c", 23.3, 530 * MB, 27.0), "no gain",
     "perplexity +0 %, same size, same speed: no gain: neither faster nor smaller than merged"),
    (variant("d", 23.3, 270 * MB, None), "recommended",  # no speed measured: judged on what was
     "perplexity +0 %, 2.0× smaller: recommended: favours size at no cost"),
])
def test_each_verdict_weighs_quality_speed_and_size(measured, level, text):
    verdict = variant_verdict(measured, REFERENCE)
    assert (verdict.level, verdict.text) == (level, text)


def test_what_a_verdict_favoured_and_paid_is_named():
    slow = variant_verdict(variant("int4", 24.0, 160 * MB, 9.6), REFERENCE)
    assert slow.favoured == ("size",) and slow.costs == ("speed",)
    fast = variant_verdict(variant("dyn", 64.3, 360 * MB, 51.2), REFERENCE)
    assert fast.favoured == ("speed", "size") and fast.costs == ("quality",) and round(fast.ratio, 2) == 2.76


def test_reference_failed_and_unmeasured():
    assert variant_verdict(REFERENCE, REFERENCE).level == "reference"
    assert variant_verdict(variant("bnb-4bit", None, error="needs CUDA"), REFERENCE).text == "not made: needs CUDA"
    assert variant_verdict(variant("e", None), REFERENCE).level == "unknown"


def test_report_table_carries_the_verdict_and_names_the_best_of_each():
    report = QuantizeReport("cpu", "text", 100, [REFERENCE, variant("int4-weight-only", 34.0, 160 * MB, 9.6),
                                                 variant("int8-dynamic", 24.0, 360 * MB, 51.2)])
    verdicts = report_verdicts(report)
    assert verdicts["int4-weight-only"].level == "check its answers"
    assert verdicts["int8-dynamic"].level == "recommended"
    assert [row["verdict"] for row in report.table()] == [v.text for v in verdicts.values()]
    assert report_highlights(report) == ("fastest: int8-dynamic (51.2 tokens/s) · smallest: int4-weight-only "
                                         "(160 MB) · best perplexity: merged (23.30)")
