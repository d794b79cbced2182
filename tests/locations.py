"""Where the tests find the repository and its bundled sample data (no file outside the checkout is read)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"
THIRD_PARTY = TEST_DATA / "third_party"  # LLaMA-Factory's sample datasets, Apache-2.0 (see NOTICE.md there)
LLAMA_FACTORY = THIRD_PARTY / "llama-factory"
WIKI_DEMO = LLAMA_FACTORY / "wiki_demo.txt"
ALPACA_DEMO = LLAMA_FACTORY / "alpaca_en_demo.json"
DPO_DEMO = LLAMA_FACTORY / "dpo_en_demo.json"  # preference ShareGPT, 30 rows
KTO_DEMO = LLAMA_FACTORY / "kto_en_demo.json"  # messages + label, 30 rows
