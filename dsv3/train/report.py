"""The end-of-run report of pretraining + context extension (the pretrain flow's result, as text).

`res` is what `flows.pretrain.pretrain_flow` returns: `run_id` (the parent MLflow run),
`pretrain` (`TrainResult.to_json()`) and, when the YaRN stages ran, `extend` (passkey
accuracy and validation loss by context length before/after, §4.3).
"""

from __future__ import annotations


def summary(res: dict, elapsed: float) -> str:
    """What `python -m flows.pretrain` prints at the end: runs, final losses, passkey accuracy,
    checkpoints, the registered model and where to look (MLflow / Prefect UIs)."""
    from dsv3.tracking import tracking_uri

    pre, ext = res["pretrain"], res.get("extend")
    final = ext or pre
    lines = [
        "", "=" * 72, f"pretrain flow finished in {elapsed / 60:.1f} min",
        f"MLflow parent run: {res['run_id']}   (pretrain run {pre.get('run_id')}"
        + (f", extend run {ext.get('run_id')})" if ext else ")"),
        f"final val/loss {pre['final'].get('val/loss', float('nan')):.4f}  val/bpb "
        f"{pre['final'].get('val/bpb', float('nan')):.4f}",
    ]
    if ext:
        lines.append(f"passkey token accuracy (lengths x depths) before {ext['passkey_before']} "
                     f"after {ext['passkey_after']}")
        lines.append(f"val loss by context length before {ext.get('val_loss_by_length_before')} "
                     f"after {ext.get('val_loss_by_length_after')}")
    lines += [
        f"pretrain checkpoint: {pre['checkpoint']}",
        f"final checkpoint:    {final['checkpoint']}",
        f"final model (HF):    {final['model_dir']}"
        + (f"  registered as {final['model_uri']}" if final.get("model_uri") else ""),
        f"MLflow UI:  make mlflow-ui   (mlflow ui --backend-store-uri {tracking_uri()}) -> http://127.0.0.1:5000",
        "Prefect UI: make prefect-ui  (prefect server start) -> http://127.0.0.1:4200",
        "=" * 72,
    ]
    return "\n".join(lines)
