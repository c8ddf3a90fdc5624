"""dsv3.evals: benchmarks through lm-eval (DeepSeek-V3 §4.4 base-model and §5.3 chat evals).

Importing this package registers the lm-eval model `dsv3` lazily (a registry placeholder
`dsv3.evals.adapter:DSV3LM`, ~0.1 s), so `import dsv3.config` stays cheap while
`lm_eval.simple_evaluate(model="dsv3", ...)` works after `import dsv3.evals`.
Modules: adapter (the LM), sandbox (code execution), tasks (task names, offline data
loaders), offline_data (`make eval-data`), runner (evaluate + MLflow), report (compare).
"""

try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own lazy placeholders first)
    from lm_eval.api.registry import model_registry

    model_registry.register("dsv3", target="dsv3.evals.adapter:DSV3LM")
except ImportError:  # lm-eval not installed: the sandbox and configs still work
    pass
