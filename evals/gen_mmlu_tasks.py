"""Regenerate evals/tasks/mmlu/*.yaml from lm-eval's own mmlu/default configs (same subjects,
descriptions, categories, prompt and metric), swapping HF loading for local JSONL."""

from pathlib import Path

import lm_eval
import yaml

SRC = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
OUT = Path(__file__).parent / "tasks" / "mmlu"


def main() -> None:
    cats = {}
    for f in sorted(SRC.glob("mmlu_*.yaml")):
        d = yaml.safe_load(f.read_text())
        subj, cat = d["dataset_name"], d["tag"].removeprefix("mmlu_").removesuffix("_tasks")
        cats.setdefault(cat, []).append(subj)
        out = {"dataset_kwargs": {"subject": subj}, "description": d["description"],
               "tag": f"dsv3_mmlu_{cat}_tasks", "include": "_template_yaml",
               "task": f"dsv3_mmlu_{subj}", "task_alias": subj}
        (OUT / f"dsv3_mmlu_{subj}.yaml").write_text(yaml.safe_dump(out, sort_keys=False))
    for cat in cats:
        g = {"group": f"dsv3_mmlu_{cat}", "group_alias": cat.replace("_", " "),
             "task": [f"dsv3_mmlu_{cat}_tasks"],
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
        (OUT / f"_dsv3_mmlu_{cat}.yaml").write_text(yaml.safe_dump(g, sort_keys=False))
    top = {"group": "dsv3_mmlu", "task": [f"dsv3_mmlu_{c}" for c in sorted(cats)],
           "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
    (OUT / "_dsv3_mmlu.yaml").write_text(yaml.safe_dump(top, sort_keys=False))
    print(f"{sum(map(len, cats.values()))} subjects in {len(cats)} categories -> {OUT}")


if __name__ == "__main__":
    main()
