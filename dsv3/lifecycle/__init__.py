"""dsv3.lifecycle: the whole path of a model as one cached, gated run (flows/lifecycle.py drives it).

data -> pretraining (`dsv3-base`) -> context extension (`dsv3-long`) -> post-training (`dsv3-chat`) ->
evaluation of every stage model -> gates -> promotion, handed on through the MLflow registry.
Modules: config (LifecycleConfig: gates, cache, held-out task), plan (stage identities: config
section + code closure + inputs; cache hits read from the store), verifiable (the held-out
exact-answer task every stage model is scored on), gates (promote or not, and why), ledger (the
lifecycle's own MLflow run: stage records, gate decisions), report (report.md + report.png from
tracked data). Above posttrain / evals / serve in the layering, below flows; no Prefect here.
"""
