"""Progress lines as the driver reads them (the Prefect progress artifact of a training run)."""

import time

from dsv3.train.run_log import RunLog, parse_progress, progress_sink, watch_progress


def test_parse_progress():
    assert parse_progress("[pretrain] step 12/250 loss 3.2 lr 1e-3") == ("pretrain", 12, 250)
    assert parse_progress("[extend_1] step 3 val/loss 2.1") is None  # a validation line
    assert parse_progress("resumed from x") is None


def test_watch_progress_follows_a_live_log(tmp_path):
    log = RunLog(tmp_path, "pretrain", rank=0)
    log.say("step 9/9 loss 1.0 (an earlier run in this folder)")
    seen = []
    with watch_progress(tmp_path, lambda s, n: seen.append((s, n)), every=0.05):
        (tmp_path / "train.log").write_text("")  # a fresh launch truncates the file
        for step in range(1, 4):
            log.say(f"step {step}/3 loss 2.0 lr 1e-3")
            time.sleep(0.15)
    assert seen and seen[-1] == (3, 3) and (9, 9) not in seen
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)


def test_progress_sink_reads_lines_split_across_chunks():
    seen = []
    feed = progress_sink(lambda s, n: seen.append((s, n)))
    feed("[pretrain] step 1/4 loss 3.0\n[pretrain] step 2/4 lo")  # the 2nd line is not complete yet
    assert seen == [(1, 4)]
    feed("ss 2.9\n[pretrain] step 2 val/loss 2.8\n")
    assert seen == [(1, 4), (2, 4)]
    bad = progress_sink(lambda s, n: 1 / 0)  # a failing callback never stops the caller
    bad("[pretrain] step 4/4 loss 1.0\n")
