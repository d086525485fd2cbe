"""The engine, method-agnostic: model ─capture→ sites (+ roles) ─spec/select→ plan ─apply→ model′.

capture.py traces with torch.export on fake tensors; sites.py finds the linear maps; roles.py
labels them from dataflow; spec.py/select.py parse rules and selectors; plan.py resolves them;
apply.py installs the plan transactionally and merges it back; probe.py checks a user's own method
on a probe input before it is installed.
"""
