"""Models-from-code entry of the dsv3 pyfunc flavour: MLflow copies this file into each logged
model and runs it at load time (see pyfunc_model.py)."""

import mlflow

from dsv3.tracking.pyfunc_model import DSV3TextGenerator

mlflow.models.set_model(DSV3TextGenerator())
