"""An operator module that fails when imported, as a typo or a missing dependency would make it:
a worker hosting it dies at every start (the crash-looping worker of test_agent_crashloop)."""

raise RuntimeError("tdist test: this operator module is broken at import")
