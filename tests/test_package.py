"""The package as a new user gets it: importable without side effects on other libraries' loggers."""

import subprocess
import sys

from tests.locations import ROOT

CHECK = """
import logging
before = {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters))
          for name in ("torchao", "torch.utils._pytree", "transformers")}
import mactuner, mactuner.devices, mactuner.train, mactuner.rag, mactuner.quantize
after = {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters)) for name in before}
assert before == after, (before, after)
mactuner.quiet_third_party_loggers()
mactuner.quiet_third_party_loggers()
assert logging.getLogger("torch.utils._pytree").level == logging.ERROR
assert len(logging.getLogger("torchao").filters) == 1
print("ok")
"""


def test_importing_mactuner_leaves_other_loggers_alone():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_no_module_under_mactuner_imports_streamlit():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "mactuner").rglob("*.py")
                 if "import streamlit" in p.read_text() or "from streamlit" in p.read_text()]
    assert not offenders
