"""dsv3: a DeepSeek-V3 model and the platform around it (data, training, post-training, evals).

`from dsv3 import DeepSeekV3, ModelConfig` is the public entry point; the heavy parts
(torch model, MLflow, Ray) are imported lazily so that `import dsv3` stays cheap.
"""

from dsv3.errors import ConfigError
from dsv3.model.config import ModelConfig

__all__ = ["DeepSeekV3", "ModelConfig", "ConfigError", "RunConfig"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "DeepSeekV3":
        from dsv3.model.transformer import DeepSeekV3

        return DeepSeekV3
    if name == "RunConfig":
        from dsv3.config import RunConfig

        return RunConfig
    raise AttributeError(name)
